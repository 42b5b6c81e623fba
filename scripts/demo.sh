#!/usr/bin/env bash
# The plugin's main job, end to end: set up the host, build and boot a real
# guest, and run examples/ (tests that break things inside the guest) with
# pytest-kvmsnap keeping every test's guest clean.  Prints the kvmsnap summary.
# Usage: sudo bash scripts/demo.sh [extra pytest args, e.g. --kvm-revert-method=restart]
source "$(dirname "$0")/common.sh"
GUEST="${KVMSNAP_DEMO_GUEST:-kvmsnap-demo}"
bash "$ROOT/scripts/setup-host.sh"
ensure_venv
ensure_guest_image
"$PY" -m pytest_kvmsnap.testing define "$GUEST"
trap '"$PY" -m pytest_kvmsnap.testing remove "$GUEST"' EXIT
cd "$ROOT/examples"
# examples/ssh needs a guest with sshd (the Debian test guest); tests/integration runs it.
"$PY" -m pytest -v -p no:cacheprovider --ignore=ssh --kvm-domain="$GUEST" "$@"
