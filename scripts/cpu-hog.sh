#!/usr/bin/env bash
# Load this host the way a busy CI machine is loaded: N extra TCG guests that spin.
# Usage: sudo bash scripts/cpu-hog.sh start [N]   (default 2: both cores of a 2-core host)
#        sudo bash scripts/cpu-hog.sh stop
# The suite must stay green beside it (issue #13: "the harness on a loaded host").
source "$(dirname "$0")/common.sh"
action=${1:-start}
count=${2:-2}
names=()
for i in $(seq 1 "$count"); do names+=("kvmsnap-hog-$i"); done
if [ "$action" = stop ]; then
    "$PY" -m pytest_kvmsnap.testing remove "${names[@]}"
    exit 0
fi
"$PY" -m pytest_kvmsnap.testing define "${names[@]}"
for name in "${names[@]}"; do
    # A busy loop in the background of the guest's shell: its QEMU takes one core.
    "$PY" -m pytest_kvmsnap.testing run "$name" --command "(while :; do :; done) >/dev/null 2>&1 & echo spinning"
done
