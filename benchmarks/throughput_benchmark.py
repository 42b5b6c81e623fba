"""Throughput (tests per second) of one guest under parallel workers, with and without clones.

Usage (as root, after scripts/setup-host.sh and with the project installed):

    python benchmarks/throughput_benchmark.py [--tests 12] [--work 1.0] [--rounds 2]

Runs the same suite (each test dirties the guest's disk and RAM, checks the
previous test's changes are gone, and keeps the guest busy for ``--work``
seconds) in one run, three ways:

1. one process;
2. ``-n 2``: two xdist workers taking turns on the one guest;
3. ``-n 2 --kvm-clones=auto``: each worker on its own clone.

Wall time includes everything a user waits for: pytest and worker start-up,
the baseline (or the copies and clones), every revert, and the end-of-run
restore.  It prints medians and the speed-up over one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import libvirt
from revert_benchmark import URI, suite_seconds  # benchmarks/ is on sys.path when run as a script

from pytest_kvmsnap.testing import Console, build_image, define_guest, remove_guest

MODES = {"1 process": ["-p", "no:xdist"], "2 workers, one guest": ["-n", "2"],
         "2 workers, clones": ["-n", "2", "--kvm-clones=auto"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=12)
    parser.add_argument("--work", type=float, default=1.0, help="seconds of guest work per test")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(URI)
    image = build_image()
    name = "kvmsnap-bench"
    define_guest(conn, name, image)
    try:
        Console(str(image.console_for(name))).wait_ready()
        seconds = {mode: statistics.median(suite_seconds(name, args.tests, *extra, work=args.work)
                                           for _ in range(args.rounds)) for mode, extra in MODES.items()}
    finally:
        remove_guest(conn, name, image)
    base = seconds["1 process"]
    print(f"{args.tests} tests, {args.work:.1f} s of guest work each, median of {args.rounds} run(s)")
    for mode, wall in seconds.items():
        print(f"  {mode:24}{wall:7.1f} s  {args.tests / wall:6.2f} tests/s  x{base / wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
