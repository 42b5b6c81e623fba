"""Per-test revert cost: hand-written revertToSnapshot vs in-place loadvm vs the plugin.

Usage (as root, after scripts/setup-host.sh and with the project installed):

    python benchmarks/revert_benchmark.py [--rounds 4] [--tests 10]

For each guest shape (256 MiB, 1 GiB, and 512 MiB with 200 MiB of tmpfs data
in its baseline) it measures, in this one run:

1. the raw calls: ``virDomain.revertToSnapshot`` (what a hand-written conftest
   does), in-place HMP ``loadvm`` and the QMP ``snapshot-load`` job through
   libvirt's monitor passthrough, each alone and until the guest has answered
   one console command again (a restored guest is slow at first under TCG);
2. per-test cost of the same N-test suite driven by a hand-written conftest
   (``-p no:kvmsnap``) that reverts after each test with ``revertToSnapshot``
   or with ``loadvm``, minus the same conftest reverting nothing;
3. the plugin's per-test overhead: the suite run with ``--kvm-revert-method``
   ``auto`` and ``libvirt``, minus ``--kvm-revert=never``.

Suite costs are (T(mode) - T(no reverts)) / (N - 1): the no-revert runs still
revert once, at the end.  The targets compare the plugin with the hand-written
suites, which pay the same post-restore guest slowness.
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
from pytest_kvmsnap.testing.guest import domain_type

HERE = Path(__file__).resolve().parent
URI = os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system")
SHAPES = [("256 MiB", 256, 0), ("1 GiB", 1024, 0), ("512 MiB + 200 MiB used", 512, 200)]


def median_of(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(fn() for _ in range(rounds))


def raw_reverts(dom, console: Console, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    snap = dom.snapshotCreateXML("<domainsnapshot><name>bench-raw</name></domainsnapshot>", 0)
    methods = {"revertToSnapshot": lambda: dom.revertToSnapshot(snap, 0),
               "loadvm": lambda: libvirt_qemu.qemuMonitorCommand(
                   dom, "loadvm bench-raw", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP),
               "snapshot-load": lambda: snapshot_load(dom, "bench-raw")}
    result = {}
    for name, revert in methods.items():
        for ready in (False, True):
            result[name + ("+ready" if ready else "")] = median_of(
                lambda r=revert, w=ready: timed_revert(console, r, w), rounds)
    assert console.run("cat /data/marker").status != 0
    snap.delete(0)
    return result


def timed_revert(console: Console, revert, then_ready: bool) -> float:  # type: ignore[no-untyped-def]
    """Dirty the guest, revert it; with ``then_ready``, until a console command answers."""
    console.check("echo x > /data/marker")
    start = time.perf_counter()
    revert()
    if then_ready:
        console.wait_ready()
    return time.perf_counter() - start


def qmp(dom, command: str, **arguments) -> object:  # type: ignore[no-untyped-def]
    text = json.dumps({"execute": command, "arguments": arguments})
    return json.loads(libvirt_qemu.qemuMonitorCommand(dom, text, 0))["return"]


def snapshot_load(dom, tag: str) -> None:  # type: ignore[no-untyped-def]
    """QEMU's QMP snapshot-load job (the alternative to HMP loadvm), waited for."""
    nodes = [b["inserted"]["node-name"] for b in qmp(dom, "query-block")  # type: ignore[attr-defined]
             if "inserted" in b and not b["inserted"]["ro"]]
    qmp(dom, "snapshot-load", **{"job-id": "bench", "tag": tag, "vmstate": nodes[0], "devices": nodes})
    while True:
        job = next(j for j in qmp(dom, "query-jobs") if j["id"] == "bench")  # type: ignore[attr-defined]
        if job["status"] == "concluded":
            qmp(dom, "job-dismiss", id="bench")
            assert "error" not in job, job
            return
        time.sleep(0.001)


def suite_seconds(guest: str, tests: int, *args: str, handwritten: str = "", work: float = 0.0,
                  suite: Path = HERE / "bench_suite.py", uri: str = URI, output: list[str] | None = None) -> float:
    """Wall time of one run of ``suite`` (also used by throughput_benchmark.py and debian_benchmark.py);
    its output lines are added to ``output`` when given."""
    no_reverts = "--kvm-revert=never" in args or handwritten == "none"
    env = dict(os.environ, KVMSNAP_BENCH_TESTS=str(tests), KVMSNAP_BENCH_GUEST=guest,
               KVMSNAP_BENCH_HANDWRITTEN=handwritten, KVMSNAP_BENCH_EXPECT_CLEAN="0" if no_reverts else "1",
               KVMSNAP_BENCH_WORK=str(work), LIBVIRT_DEFAULT_URI=uri)
    plugin = ["-p", "no:kvmsnap", "-W", "ignore::pytest.PytestUnknownMarkWarning"] if handwritten else [
        f"--kvm-uri={uri}", f"--kvm-domain={guest}"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           str(suite), *plugin, *args],
                          env=env, check=True, stdout=subprocess.DEVNULL if output is None else subprocess.PIPE,
                          text=True, cwd=HERE)
    seconds = time.perf_counter() - start
    if output is not None:
        output.extend(done.stdout.splitlines())
    return seconds


def suite_costs(guest: str, tests: int, rounds: int) -> dict[str, float]:
    """Per-test cost of each way of reverting, the same suite without reverts subtracted."""
    def suite(*args: str, handwritten: str = "") -> float:
        return median_of(lambda: suite_seconds(guest, tests, "-p", "no:xdist", *args, handwritten=handwritten),
                         rounds)

    hand_none, never = suite(handwritten="none"), suite("--kvm-revert=never")
    costs = {f"hand-written {m}": suite(handwritten=m) - hand_none for m in ("revertToSnapshot", "loadvm")}
    costs.update({f"plugin {m}": suite(f"--kvm-revert-method={m}") - never for m in ("auto", "restart")})
    return {name: seconds / (tests - 1) for name, seconds in costs.items()}


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
        row.update(suite_costs(name, args.tests, max(1, args.rounds // 2)))
        return row
    finally:
        remove_guest(conn, name, image)


def print_table(rows: dict[str, dict[str, float]]) -> None:
    for label, row in rows.items():
        print(f"== {label}")
        for column, seconds in row.items():
            print(f"  {column:34}{seconds:8.3f} s")
        auto = row["plugin auto"]
        print(f"  plugin auto / hand-written revertToSnapshot = {auto / row['hand-written revertToSnapshot']:.3f}"
              " (target <= 0.1)")
        print(f"  plugin auto / hand-written loadvm           = {auto / row['hand-written loadvm']:.2f}"
              " (target <= 1.5)")
        print(f"  plugin auto / raw loadvm call               = {auto / row['loadvm']:.2f}"
              " (includes the guest's post-restore slowness)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="repetitions of each raw measurement")
    parser.add_argument("--tests", type=int, default=10, help="tests in the plugin suite")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="measure only the first N guest shapes")
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(URI)
    image = build_image()
    print(f"guests run under {'KVM' if domain_type(conn, image) == 'kvm' else 'TCG (no working KVM here)'}")
    rows = {label: measure_shape(conn, image, label, mem, used, args) for label, mem, used in SHAPES[:args.shapes]}
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
