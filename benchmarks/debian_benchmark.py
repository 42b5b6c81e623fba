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


def gaps(times: Path) -> list[float]:
    """Each gap from a test's last command to the next test's first command completing."""
    stamps = {(i, what): at for i, what, at in map(json.loads, times.read_text().splitlines())}
    tests = sorted({i for i, _ in stamps})
    return [stamps[(i, "usable")] - stamps[(i - 1, "done")] for i in tests[1:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="every suite this many times, interleaved")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    conn = libvirt.open(URI)
    image, name = start_guest(conn), GUEST
    suite = HERE / "bench_ssh_suite.py"
    times = Path(tempfile.mkdtemp()) / "times.jsonl"
    os.environ["KVMSNAP_BENCH_TIMES"] = str(times)
    # row -> (plugin options, hand-written method, kvm_ssh); the two no-revert runs are the baselines
    runs = {"no reverts (plugin)": (["--kvm-revert=never"], "", False),
            "no reverts (hand-written)": ([], "none", False),
            **{mode: (extra, "", kvm_ssh) for mode, (extra, kvm_ssh) in MODES.items()},
            **{f"hand-written {m}, paramiko login": ([], m, False) for m in ("loadvm", "revertToSnapshot")}}
    took: dict[str, list[float]] = {row: [] for row in runs}
    usable: dict[str, list[float]] = {row: [] for row in runs}

    def measure(row: str) -> None:
        extra, handwritten, kvm_ssh = runs[row]
        os.environ["KVMSNAP_BENCH_KVM_SSH"] = "1" if kvm_ssh else ""
        options = [*extra, f"--kvm-ssh-key={image.ssh_key}"] if kvm_ssh else list(extra)
        times.unlink(missing_ok=True)
        took[row].append(suite_seconds(name, args.tests, "-p", "no:xdist", *options, handwritten=handwritten,
                                       suite=suite))
        usable[row].extend(gaps(times))
        print(f"  {row}: {took[row][-1]:.1f} s, revert to usable {statistics.median(gaps(times)):.3f} s",
              flush=True)
    try:
        suite_seconds(name, args.tests, "-p", "no:xdist", "--kvm-revert=never", suite=suite)  # warm-up
        for _ in range(args.rounds):  # interleaved: a slow minute of the host hits every row alike
            for row in runs:
                measure(row)
    finally:
        remove(conn, image)
    accelerator = "KVM" if domain_type(conn, build_image()) == "kvm" else "TCG (no working KVM here)"
    suite_time = {row: statistics.median(values) for row, values in took.items()}
    reference = statistics.median(usable["hand-written loadvm, paramiko login"])
    rows = {}
    print(f"== Debian 12, 512 MiB, {accelerator}, {args.tests} SSH tests x {args.rounds} round(s)")
    print(f"  {'':46}{'per test':>10}{'revert to usable (quartiles)':>34}{'ratio':>8}")
    for row, (_, handwritten, _) in runs.items():
        if row.startswith("no reverts"):
            continue
        base = suite_time["no reverts (hand-written)" if handwritten else "no reverts (plugin)"]
        cost = (suite_time[row] - base) / (args.tests - 1)
        q1, median, q3 = statistics.quantiles(usable[row], n=4)
        rows[row] = {"per_test": cost, "revert_to_usable": median, "q1": q1, "q3": q3, "ratio": median / reference}
        print(f"  {row:46}{cost:8.3f} s{median:12.3f} s ({q1:.3f}-{q3:.3f}){median / reference:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"accelerator": accelerator, "tests": args.tests, "rounds": args.rounds,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
