"""Per-test cost on a real distribution over SSH: the plugin's after-revert steps, side by side.

Usage (as root, after scripts/setup-host.sh, with the project installed):

    python benchmarks/debian_benchmark.py [--tests 8] [--rounds 1]

On the Debian 12 test guest (512 MiB, KVM where it works, else TCG), the same
suite (bench_ssh_suite.py: each test runs a first command over SSH, then a
second) runs, in this one run:

- with the plugin: the clock and reseed steps off (revert only); the defaults
  (clock + reseed through the guest agent), with the test's own paramiko login;
  the defaults with the plugin's ``kvm_ssh`` (clock + reseed over its
  connection); the defaults with ``--kvm-wait=ssh``;
- with a hand-written conftest reverting with ``loadvm`` or ``revertToSnapshot``
  and logging in with paramiko.

Two figures per row: the per-test cost, (T(mode) - T(no reverts)) / (N - 1) as
in revert_benchmark.py; and *revert to usable*, the median gap from one test's
last command to the next test's first command completing (teardown, revert,
the plugin's steps, login and that command), timed by the suite itself.  The
ratio is revert to usable against the hand-written ``loadvm`` conftest's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import libvirt
from revert_benchmark import URI, suite_seconds  # benchmarks/ is on sys.path when run as a script

from pytest_kvmsnap.testing.debian import DebianImage, build_debian, define_debian, wait_until_settled
from pytest_kvmsnap.testing.guest import build_image, domain_type, remove_guest

HERE = Path(__file__).resolve().parent
GUEST = "kvmsnap-bench-debian"
# row -> (plugin options, whether the suite uses kvm_ssh)
MODES = {
    "plugin, revert only (no clock, no reseed)": (["--kvm-sync-clock=off", "--kvm-reseed=off"], False),
    "plugin, defaults (agent), own paramiko login": ([], False),
    "plugin, defaults, kvm_ssh": ([], True),
    "plugin, defaults + --kvm-wait=ssh, own login": (["--kvm-wait=ssh"], False),
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


def revert_to_usable(times: Path) -> float:
    """The median gap from a test's last command to the next test's first command completing."""
    stamps = {(i, what): at for i, what, at in map(json.loads, times.read_text().splitlines())}
    tests = sorted({i for i, _ in stamps})
    return statistics.median(stamps[(i, "usable")] - stamps[(i - 1, "done")] for i in tests[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    conn = libvirt.open(URI)
    image, name = start_guest(conn), GUEST
    suite = HERE / "bench_ssh_suite.py"
    times = Path(tempfile.mkdtemp()) / "times.jsonl"

    def measure(*extra: str, handwritten: str = "", kvm_ssh: bool = False) -> tuple[float, float]:
        """(suite seconds, revert to usable), medians over the rounds."""
        os.environ["KVMSNAP_BENCH_KVM_SSH"] = "1" if kvm_ssh else ""
        options = [*extra, f"--kvm-ssh-key={image.ssh_key}"] if kvm_ssh else list(extra)
        runs = []
        for _ in range(args.rounds):
            times.unlink(missing_ok=True)
            took = suite_seconds(name, args.tests, "-p", "no:xdist", *options, handwritten=handwritten, suite=suite)
            runs.append((took, revert_to_usable(times)))
        took, usable = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"  suite {' '.join(options) or handwritten or 'defaults'}{' (kvm_ssh)' if kvm_ssh else ''}: "
              f"{took:.1f} s, revert to usable {usable:.3f} s", flush=True)
        return took, usable
    os.environ["KVMSNAP_BENCH_TIMES"] = str(times)
    try:
        measure("--kvm-revert=never")  # warm-up
        never, hand_none = measure("--kvm-revert=never")[0], measure(handwritten="none")[0]
        rows = {}
        for mode, (extra, kvm_ssh) in MODES.items():
            took, usable = measure(*extra, kvm_ssh=kvm_ssh)
            rows[mode] = ((took - never) / (args.tests - 1), usable)
        for method in ("loadvm", "revertToSnapshot"):
            took, usable = measure(handwritten=method)
            rows[f"hand-written {method}, paramiko login"] = ((took - hand_none) / (args.tests - 1), usable)
    finally:
        remove(conn, image)
    accelerator = "KVM" if domain_type(conn, build_image()) == "kvm" else "TCG (no working KVM here)"
    reference = rows["hand-written loadvm, paramiko login"][1]
    print(f"== Debian 12, 512 MiB, {accelerator}, {args.tests} SSH tests")
    print(f"  {'':46}{'per test':>10}{'revert to usable':>18}{'ratio':>8}")
    for mode, (cost, usable) in rows.items():
        print(f"  {mode:46}{cost:8.3f} s{usable:16.3f} s{usable / reference:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"accelerator": accelerator, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
