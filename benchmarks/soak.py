"""Soak: a thousand tests that each dirty the guest, a revert after each, nothing growing.

Usage (as root, after scripts/setup-host.sh, with the project installed):

    python benchmarks/soak.py [--tests 1000] [--every 50] [--json out.json]

It defines the busybox test guest ``kvmsnap-soak`` (256 MiB), runs pytest *in
this process* (so the pytest process sampled is this one) on
``soak_suite.py`` with the plugin's default revert after each test, and every
``--every`` tests samples:

- the guest's qcow2 image on disk (``qemu-img info``: allocated bytes) and its
  snapshot count (the run's baseline is the only one);
- this process's RSS and open file descriptors, libvirtd's RSS, QEMU's RSS;
- the revert times of the window just ended: p50 and p99 (with 50 reverts, a
  window's p99 is close to its largest, one outlier; the goal on p99 compares
  the run's first and last 200 reverts instead).

Each test writes 64 KiB of fresh random data to the disk and 4 MiB to RAM
(tmpfs).  The bound on the image's growth over the first sample: twice what
one test writes to the disk plus 2 MiB (ext4's journal and metadata blocks,
qcow2's tables), since the clusters a revert frees are reused; the other
goals: no growth in fds, RSS within 10 % + 4 MiB of the second sample (the
first includes warm-up), the p99 of the last 200 reverts within 1.2x that of
the first 200.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import libvirt
import pytest

from pytest_kvmsnap.testing import Console, build_image, define_guest, remove_guest

HERE = Path(__file__).resolve().parent
URI = os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system")
GUEST = "kvmsnap-soak"
WRITES = 64 * 1024  # bytes each test writes to the disk (soak_suite.py)


@dataclass
class Sample:
    tests: int
    image_bytes: int
    snapshots: int
    pytest_rss_kib: int
    pytest_fds: int
    libvirtd_rss_kib: int
    qemu_rss_kib: int
    revert_p50: float
    revert_p99: float


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pid_of(name: str) -> int:
    return int(subprocess.run(["pgrep", "-o", "-x", name], capture_output=True, text=True, check=True).stdout)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Sampler:
    """A pytest plugin object: revert times from the plugin's hook, a sample every ``every`` tests."""

    def __init__(self, dom: libvirt.virDomain, disk: Path, every: int) -> None:
        self.dom, self.disk, self.every = dom, disk, every
        self.window: list[float] = []
        self.reverts: list[float] = []  # every revert of the run, in order
        self.samples: list[Sample] = []
        self.done = 0

    def pytest_kvmsnap_reverted(self, seconds: float) -> None:
        self.window.append(seconds)
        self.reverts.append(seconds)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        self.done += 1
        if self.done % self.every == 0:
            self.samples.append(self.sample())
            self.window = []

    def sample(self) -> Sample:
        info = json.loads(subprocess.run(["qemu-img", "info", "--force-share", "--output=json", str(self.disk)],
                                         capture_output=True, text=True, check=True).stdout)
        qemu = int(Path(f"/run/libvirt/qemu/{GUEST}.pid").read_text())
        return Sample(self.done, int(info["actual-size"]), self.dom.snapshotNum(0), rss_kib(os.getpid()),
                      len(os.listdir("/proc/self/fd")), rss_kib(pid_of("libvirtd")), rss_kib(qemu),
                      statistics.median(self.window) if self.window else 0.0,
                      percentile(self.window, 0.99) if self.window else 0.0)


P99_SPAN = 200  # reverts: a p99 of the 50 in one window is its largest; 200 make it a percentile


def p99_first_last(reverts: list[float]) -> tuple[float, float]:
    """The p99 of the run's first and last P99_SPAN reverts."""
    return percentile(reverts[:P99_SPAN], 0.99), percentile(reverts[-P99_SPAN:], 0.99)


def check(samples: list[Sample], reverts: list[float]) -> list[str]:
    """The goals; one line per goal missed."""
    first, last = samples[0], samples[-1]
    problems = []
    bound = first.image_bytes + 2 * WRITES + 2 * 2**20
    if max(s.image_bytes for s in samples) > bound:
        problems.append(f"image grew beyond {bound} bytes: {[s.image_bytes for s in samples]}")
    if any(s.snapshots != 1 for s in samples):
        problems.append(f"snapshot count changed: {[s.snapshots for s in samples]}")
    if last.pytest_fds > first.pytest_fds:
        problems.append(f"pytest's open fds grew: {first.pytest_fds} -> {last.pytest_fds}")
    for name in ("pytest_rss_kib", "libvirtd_rss_kib", "qemu_rss_kib"):
        start, end = getattr(samples[1 if len(samples) > 1 else 0], name), getattr(last, name)
        if end > start * 1.10 + 4096:  # noise: 10 % and 4 MiB
            problems.append(f"{name} grew from {start} to {end}")
    early, late = p99_first_last(reverts)
    if late > early * 1.2:
        problems.append(f"p99 of the last {P99_SPAN} reverts {late:.3f} s > 1.2 x the first {P99_SPAN}'s {early:.3f} s")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tests", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(URI)
    image = build_image()
    dom = define_guest(conn, GUEST, image)
    Console(str(image.console_for(GUEST))).wait_ready()
    sampler = Sampler(dom, image.disk_for(GUEST), args.every)
    os.environ["KVMSNAP_SOAK_GUEST"] = GUEST
    os.environ["KVMSNAP_SOAK_TESTS"] = str(args.tests)
    start = time.monotonic()
    try:
        code = pytest.main([str(HERE / "soak_suite.py"), f"--kvm-uri={URI}", "-q", "-p", "no:cacheprovider",
                            "-p", "no:randomly", f"--rootdir={HERE}"], plugins=[sampler])
    finally:
        remove_guest(conn, GUEST, image)
    elapsed = time.monotonic() - start
    print(f"\n{args.tests} tests in {elapsed:.0f} s, pytest exit {code}; image growth bound "
          f"{(2 * WRITES + 2 * 2**20) / 2**20:.1f} MiB over the first sample")
    print(f"{'tests':>6} {'image MiB':>9} {'snaps':>5} {'pytest RSS':>10} {'fds':>4} {'libvirtd RSS':>12} "
          f"{'QEMU RSS':>9} {'p50 s':>6} {'p99 s':>6}")
    for s in sampler.samples:
        print(f"{s.tests:>6} {s.image_bytes / 2**20:>9.2f} {s.snapshots:>5} {s.pytest_rss_kib // 1024:>7} MiB "
              f"{s.pytest_fds:>4} {s.libvirtd_rss_kib // 1024:>9} MiB {s.qemu_rss_kib // 1024:>6} MiB "
              f"{s.revert_p50:>6.3f} {s.revert_p99:>6.3f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in sampler.samples], indent=1))
    if len(sampler.reverts) >= P99_SPAN:
        early, late = p99_first_last(sampler.reverts)
        print(f"revert p99: first {P99_SPAN} {early:.3f} s, last {P99_SPAN} {late:.3f} s "
              f"(a window's p99 above is nearly its largest of {args.every})")
    problems = check(sampler.samples, sampler.reverts) if sampler.samples else ["no samples"]
    for problem in problems:
        print(f"GOAL MISSED: {problem}")
    return 1 if problems or code else 0


if __name__ == "__main__":
    sys.exit(main())
