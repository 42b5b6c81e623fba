# Shared by scripts/demo.sh, scripts/test.sh and .ci/run: a venv with the
# project and its test extras, and the cached test-guest image.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVMSNAP_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

ensure_venv() {
    if [ ! -x "$PY" ]; then
        echo "kvmsnap: creating venv $VENV"
        python3 -m venv "$VENV"
    fi
    # libvirt-python compiles against libvirt-dev: the first install takes a minute.
    "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
}

ensure_guest_image() {
    "$PY" -m pytest_kvmsnap.testing build
}

ensure_debian_image() {
    # Debian 12 from Debian's archive with mmdebstrap: about 45 s the first time, then cached.
    "$PY" -m pytest_kvmsnap.testing build-debian
}
