#!/usr/bin/env bash
# The whole test suite: host setup, venv, guest image, then lint, types and
# every test (unit on libvirt's test driver, integration on real QEMU guests).
# Usage: sudo bash scripts/test.sh [extra pytest args]
source "$(dirname "$0")/common.sh"
bash "$ROOT/scripts/setup-host.sh"
ensure_venv
ensure_guest_image
cd "$ROOT"
# The Debian guest, unless the run is given only test paths, none holding Debian's tests.
needs_debian=$([ "$#" -eq 0 ] && echo 1 || true)
for arg in "$@"; do
    case "$arg" in
        tests/*) if find "${arg%%::*}" -name '*debian*' 2>/dev/null | grep -q .; then needs_debian=1; fi ;;
        *) needs_debian=1 ;;  # an option (-k, -m ...): the run may select anything
    esac
done
if [ -n "$needs_debian" ]; then
    ensure_debian_image
fi
# The second hypervisor of the pool tests (tests/integration/test_pool.py): an
# unprivileged user's libvirtd, reached over real SSH.
if [ -z "${KVMSNAP_POOL_URI:-}" ]; then
    KVMSNAP_POOL_URI="$(bash "$ROOT/scripts/setup-ssh-hypervisor.sh")"
    KVMSNAP_POOL_GUEST_DIR="$(getent passwd "${KVMSNAP_SSH_USER:-kvmsnap-remote}" | cut -d: -f6)/images"
    export KVMSNAP_POOL_URI KVMSNAP_POOL_GUEST_DIR
fi
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
