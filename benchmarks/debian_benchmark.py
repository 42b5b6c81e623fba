"""Per-test cost on a real distribution over SSH: the plugin's after-revert steps, side by side.

Usage (as root, after scripts/setup-host.sh, with the project installed):

    python benchmarks/debian_benchmark.py [--tests 8] [--rounds 1]

On the Debian 12 test guest (512 MiB, TCG unless KVM works), the same suite
(bench_ssh_suite.py: each test logs in over SSH, retrying until sshd answers)
runs, in this one run:

- with the plugin: the agent steps off (revert only), on (clock + reseed, the
  default), and on with ``--kvm-wait=ssh``;
- with a hand-written conftest reverting with ``loadvm`` or ``revertToSnapshot``.

Costs are (T(mode) - T(no reverts)) / (N - 1), as in revert_benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import libvirt
from revert_benchmark import URI, suite_seconds  # benchmarks/ is on sys.path when run as a script

from pytest_kvmsnap.testing.debian import DebianImage, build_debian, define_debian, wait_until_settled
from pytest_kvmsnap.testing.guest import build_image, domain_type, remove_guest

HERE = Path(__file__).resolve().parent
GUEST = "kvmsnap-bench-debian"
MODES = {
    "plugin, revert only": ["--kvm-sync-clock=off", "--kvm-reseed=off"],
    "plugin, clock + reseed (default)": [],
    "plugin, clock + reseed + --kvm-wait=ssh": ["--kvm-wait=ssh"],
}


def start_guest(conn: libvirt.virConnect) -> DebianImage:
    """The benchmarks' Debian guest, defined afresh and settled (a baseline taken mid-boot replays
    the boot after every revert); its key is exported for the SSH suites."""
    libvirt.registerErrorHandler(lambda *_: None, None)
    image = build_debian()
    wait_until_settled(define_debian(conn, GUEST, image))
    os.environ["KVMSNAP_BENCH_SSH_KEY"] = str(image.ssh_key)
    return image


def remove(conn: libvirt.virConnect, image: DebianImage) -> None:
    remove_guest(conn, GUEST)
    image.disk_for(GUEST).unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    conn = libvirt.open(URI)
    image, name = start_guest(conn), GUEST
    suite = HERE / "bench_ssh_suite.py"

    def seconds(*extra: str, handwritten: str = "") -> float:
        took = statistics.median(suite_seconds(name, args.tests, "-p", "no:xdist", *extra, handwritten=handwritten,
                                               suite=suite) for _ in range(args.rounds))
        print(f"  suite {' '.join(extra) or handwritten or 'defaults'}: {took:.1f} s", flush=True)
        return took
    try:
        seconds("--kvm-revert=never")  # warm-up
        never, hand_none = seconds("--kvm-revert=never"), seconds(handwritten="none")
        rows = {mode: (seconds(*extra) - never) / (args.tests - 1) for mode, extra in MODES.items()}
        rows.update({f"hand-written {m}": (seconds(handwritten=m) - hand_none) / (args.tests - 1)
                     for m in ("loadvm", "revertToSnapshot")})
    finally:
        remove(conn, image)
    accelerator = "KVM" if domain_type(conn, build_image()) == "kvm" else "TCG (no working KVM here)"
    print(f"== Debian 12, 512 MiB, {accelerator}, {args.tests} SSH tests, per-test cost")
    for mode, cost in rows.items():
        print(f"  {mode:42}{cost:8.3f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
