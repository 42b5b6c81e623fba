#!/usr/bin/env bash
# The whole test suite: host setup, venv, guest image, then lint, types and
# every test (unit on libvirt's test driver, integration on real QEMU guests).
# Usage: sudo bash scripts/test.sh [extra pytest args]
source "$(dirname "$0")/common.sh"
bash "$ROOT/scripts/setup-host.sh"
ensure_venv
ensure_guest_image
ensure_debian_image
cd "$ROOT"
"$VENV/bin/ruff" check pytest_kvmsnap tests examples benchmarks
"$VENV/bin/mypy" pytest_kvmsnap tests
set +e
"$PY" -m pytest -ra -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "kvmsnap: pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$status"
