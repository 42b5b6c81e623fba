"""Throughput (tests per second) of one guest under parallel workers, with and without clones.

Usage (as root, after scripts/setup-host.sh and with the project installed):

    python benchmarks/throughput_benchmark.py [--tests 12] [--work 1.0] [--rounds 2] [--pool URI,DIR]

Runs the same suite (each test dirties the guest's disk and RAM, checks the
previous test's changes are gone, and keeps the guest busy for ``--work``
seconds) in one run, three ways:

1. one process;
2. ``-n 2``: two xdist workers taking turns on the one guest;
3. ``-n 2 --kvm-clones=auto``: each worker on its own clone.

With ``--pool URI,DIR`` (a second hypervisor, and the directory its test guest's
files go in; ``scripts/setup-ssh-hypervisor.sh`` makes one reached over SSH)
the same guest is defined there too, and three more ways run:

4. one process on the second hypervisor alone: against 1., what the remote
   hop adds per test, and the median revert there against here;
5. ``-n 2`` over the pool of both: each worker on its own host;
6. ``-n 2 --kvm-clones=auto`` over the pool: each worker's clone on its host.

Wall time includes everything a user waits for: pytest and worker start-up,
the baseline (or the copies and clones), every revert, and the end-of-run
restore.  It prints medians and the speed-up over one process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

import libvirt
from revert_benchmark import URI, suite_seconds  # benchmarks/ is on sys.path when run as a script

from pytest_kvmsnap.testing import Console, build_image, define_guest, remove_guest

MODES = {"1 process": ["-p", "no:xdist"], "2 workers, one guest": ["-n", "2"],
         "2 workers, clones": ["-n", "2", "--kvm-clones=auto"]}
POOL_MODES = {"1 process, remote host only": ["-p", "no:xdist"], "2 workers, pool of 2 hosts": ["-n", "2"],
              "2 workers, clones over the pool": ["-n", "2", "--kvm-clones=auto"]}
NAME = "kvmsnap-bench"
REVERTS = re.compile(r"kvmsnap: \d+ revert\(s\), median ([\d.]+) s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=12)
    parser.add_argument("--work", type=float, default=1.0, help="seconds of guest work per test")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pool", default="", help="URI,DIR of a second hypervisor and its guest directory")
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)
    hosts = {URI: build_image()}
    if args.pool:
        pool_uri, directory = args.pool.rsplit(",", 1)
        hosts[pool_uri] = build_image(Path(directory))
        os.environ["KVMSNAP_BENCH_DIRS"] = json.dumps({uri: str(image.directory) for uri, image in hosts.items()})
    for uri, image in hosts.items():
        define_guest(libvirt.open(uri), NAME, image)
        Console(str(image.console_for(NAME))).wait_ready()
    outputs: dict[str, list[str]] = {mode: [] for mode in [*MODES, *POOL_MODES]}
    try:
        seconds = {mode: statistics.median(suite_seconds(NAME, args.tests, *extra, work=args.work,
                                                         output=outputs[mode])
                                           for _ in range(args.rounds)) for mode, extra in MODES.items()}
        if args.pool:
            seconds.update({mode: statistics.median(_pool_run(mode, extra, pool_uri, args, outputs[mode])
                                                    for _ in range(args.rounds))
                            for mode, extra in POOL_MODES.items()})
    finally:
        for uri, image in hosts.items():
            remove_guest(libvirt.open(uri), NAME, image)
    base = seconds["1 process"]
    print(f"{args.tests} tests, {args.work:.1f} s of guest work each, median of {args.rounds} run(s)")
    for mode, wall in seconds.items():
        print(f"  {mode:32}{wall:7.1f} s  {args.tests / wall:6.2f} tests/s  x{base / wall:.2f}")
    if args.pool:
        hop = (seconds["1 process, remote host only"] - base) / args.tests
        print(f"  the remote hop adds {hop * 1000:.0f} ms per test (wall time, one process); median revert "
              f"{_median_revert(outputs['1 process']):.3f} s here, "
              f"{_median_revert(outputs['1 process, remote host only']):.3f} s there")
    return 0


def _pool_run(mode: str, extra: list[str], pool_uri: str, args: argparse.Namespace, output: list[str]) -> float:
    if mode == "1 process, remote host only":
        return suite_seconds(NAME, args.tests, *extra, work=args.work, uri=pool_uri, output=output)
    return suite_seconds(NAME, args.tests, *extra, f"--kvm-uri={pool_uri}", work=args.work, output=output)


def _median_revert(lines: list[str]) -> float:
    """The median of the runs' medians, from the plugin's summary line ``kvmsnap: N revert(s), median X s``."""
    found = [float(match.group(1)) for line in lines if (match := REVERTS.match(line))]
    return statistics.median(found) if found else float("nan")


if __name__ == "__main__":
    sys.exit(main())
