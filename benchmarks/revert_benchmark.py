"""Per-test revert cost: hand-written revertToSnapshot vs in-place loadvm vs the plugin.

Usage (as root, after scripts/setup-host.sh and with the project installed):

    python benchmarks/revert_benchmark.py [--rounds 5] [--tests 10]

For each guest shape (256 MiB, 1 GiB, and 512 MiB with 200 MiB of tmpfs data
in its baseline) it measures, in this one run:

1. raw ``virDomain.revertToSnapshot`` -- what a hand-written conftest does --
   and the time until the guest answers on its console again;
2. raw in-place QEMU ``loadvm`` through libvirt's monitor passthrough;
3. the plugin's per-test overhead: the same N-test suite run with
   ``--kvm-revert-method=auto``, ``--kvm-revert-method=libvirt`` and
   ``--kvm-revert=never``; overhead = (T(mode) - T(never)) / (N - 1), since the
   never run still reverts once at the end.

It prints medians and the ratios the project's targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import libvirt_qemu

from pytest_kvmsnap.testing import Console, build_image, define_guest, remove_guest

HERE = Path(__file__).resolve().parent
URI = os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system")
SHAPES = [("256 MiB", 256, 0), ("1 GiB", 1024, 0), ("512 MiB + 200 MiB used", 512, 200)]


def median_of(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(fn() for _ in range(rounds))


def raw_reverts(dom, console: Console, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    snap = dom.snapshotCreateXML("<domainsnapshot><name>bench-raw</name></domainsnapshot>", 0)

    def libvirt_revert() -> float:
        console.check("echo x > /data/marker")
        start = time.perf_counter()
        dom.revertToSnapshot(snap, 0)
        return time.perf_counter() - start

    def libvirt_revert_ready() -> float:
        console.check("echo x > /data/marker")
        start = time.perf_counter()
        dom.revertToSnapshot(snap, 0)
        console.wait_ready()
        return time.perf_counter() - start

    def loadvm() -> float:
        console.check("echo x > /data/marker")
        start = time.perf_counter()
        libvirt_qemu.qemuMonitorCommand(dom, "loadvm bench-raw",
                                        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        return time.perf_counter() - start

    result = {"revertToSnapshot": median_of(libvirt_revert, rounds),
              "revertToSnapshot+ready": median_of(libvirt_revert_ready, rounds),
              "loadvm": median_of(loadvm, rounds)}
    assert console.run("cat /data/marker").status != 0
    snap.delete(0)
    return result


def suite_seconds(guest: str, tests: int, *args: str) -> float:
    env = dict(os.environ, KVMSNAP_BENCH_TESTS=str(tests),
               KVMSNAP_BENCH_EXPECT_CLEAN="0" if "--kvm-revert=never" in args else "1")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                    str(HERE / "bench_suite.py"), f"--kvm-uri={URI}", f"--kvm-domain={guest}", *args],
                   env=env, check=True, stdout=subprocess.DEVNULL, cwd=HERE)
    return time.perf_counter() - start


def plugin_overhead(guest: str, tests: int, rounds: int) -> dict[str, float]:
    modes = {"auto": ["--kvm-revert-method=auto"], "libvirt": ["--kvm-revert-method=libvirt"],
             "never": ["--kvm-revert=never"]}
    times = {name: median_of(lambda a=args: suite_seconds(guest, tests, *a), rounds)
             for name, args in modes.items()}
    return {f"plugin {name}": (times[name] - times["never"]) / (tests - 1) for name in ("auto", "libvirt")}


def measure_shape(conn, image, label: str, memory: int, used: int, args) -> dict[str, float]:  # type: ignore[no-untyped-def]
    name = "kvmsnap-bench"
    dom = define_guest(conn, name, image, memory)
    try:
        console = Console(str(image.console_for(name)))
        console.wait_ready()
        if used:  # incompressible data, so the snapshot really carries it
            console.check(f"dd if=/dev/urandom of=/tmp/fill bs=1M count={used} 2>/dev/null", timeout=300)
        start = time.perf_counter()
        snap = dom.snapshotCreateXML("<domainsnapshot><name>bench-create</name></domainsnapshot>", 0)
        created = time.perf_counter() - start
        snap.delete(0)
        row = {"snapshot create": created, **raw_reverts(dom, console, args.rounds)}
        row.update(plugin_overhead(name, args.tests, max(1, args.rounds // 2)))
        return row
    finally:
        remove_guest(conn, name, image)


def print_table(rows: dict[str, dict[str, float]]) -> None:
    columns = list(next(iter(rows.values())))
    print(f"{'guest':26}" + "".join(f"{c:>24}" for c in columns))
    for label, row in rows.items():
        print(f"{label:26}" + "".join(f"{row[c]:>23.3f}s" for c in columns))
    print()
    for label, row in rows.items():
        print(f"{label}: plugin auto overhead = {row['plugin auto'] / row['revertToSnapshot']:.3f} x "
              f"hand-written revertToSnapshot (target <= 0.1), "
              f"{row['plugin auto'] / row['loadvm']:.2f} x raw loadvm (target <= 1.5)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="repetitions of each raw measurement")
    parser.add_argument("--tests", type=int, default=10, help="tests in the plugin suite")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(URI)
    image = build_image()
    rows = {label: measure_shape(conn, image, label, mem, used, args) for label, mem, used in SHAPES}
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
