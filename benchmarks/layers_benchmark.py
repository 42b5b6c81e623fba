"""Layered baselines on the Debian guest: what a layer costs per test, to take, and to end.

Usage (as root, after scripts/setup-host.sh, with the project installed):

    python benchmarks/layers_benchmark.py [--tests 20]

The SSH suite layers_suite.py runs on the Debian 12 test guest (512 MiB, TCG
unless KVM works), side by side in this one run:

- without a session fixture: the plugin reverting after each test, and not
  reverting (``--kvm-revert=never``);
- with a session fixture that sets an application up over SSH (data, files, a
  service; over 20 s under TCG): the plugin checkpoints it as a layer and every
  test starts from it; again reverting and not.

Then the same fixture as a ``@guest_setup`` on a fixed base snapshot, in two
runs: the first runs it and keeps its layer, the second reuses it; for each,
the time from starting pytest to the first test's body.

Per-test cost is (T(revert) - T(never)) / (N - 1) for each, as in
revert_benchmark.py: the same suite without reverts subtracted.  The checkpoint
is timed by the plugin (its summary); the layer's end is the time from the
fixture's teardown to the last test's end (the revert down to the baseline and
the layer's deletion).  Without layers a user kept such setup correct only by
running it in every test: that per-test cost is the setup's own time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import libvirt
from debian_benchmark import GUEST, remove, start_guest  # benchmarks/ is on sys.path when run as a script
from revert_benchmark import URI, suite_seconds

from pytest_kvmsnap.testing.guest import build_image, domain_type

HERE = Path(__file__).resolve().parent
CHECKPOINTS = re.compile(r"(\d+) checkpoint\(s\) of wider fixtures' state, median ([\d.]+) s")


def kept_runs(conn: libvirt.virConnect, name: str, tests: int, suite: Path, times: Path) -> tuple[float, float]:
    """From starting pytest to the first test's body, in the run that keeps the guest setup and
    in the next one, which reuses it (on a base snapshot of the guest as it is now)."""
    conn.lookupByName(name).snapshotCreateXML("<domainsnapshot><name>bench-base</name></domainsnapshot>", 0)
    os.environ["KVMSNAP_BENCH_APP"] = "kept"
    until_first = []
    for label in ("keeps", "reuses"):
        times.unlink(missing_ok=True)
        output: list[str] = []
        start = time.perf_counter()
        took = suite_seconds(name, tests, "-p", "no:xdist", "-p", "layers_timing", "--kvm-snapshot=bench-base",
                             suite=suite, output=output)
        called = min(json.loads(line)["test_called"] for line in times.read_text().splitlines()
                     if "test_called" in line)
        until_first.append(called - start)
        print(f"  suite with the @guest_setup fixture, the run that {label} it: {took:.1f} s, first test after "
              f"{until_first[-1]:.1f} s", flush=True)
        if ("reused from" in "\n".join(output)) != (label == "reuses"):
            raise SystemExit(f"the run that {label} the setup did not:\n" + "\n".join(output[-20:]))
    return until_first[0], until_first[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    conn = libvirt.open(URI)
    image, name = start_guest(conn), GUEST
    times = Path(tempfile.mkdtemp()) / "times.jsonl"
    os.environ["KVMSNAP_BENCH_TIMES"] = str(times)
    suite = HERE / "layers_suite.py"

    def seconds(app: bool, *extra: str, output: list[str] | None = None) -> float:
        os.environ["KVMSNAP_BENCH_APP"] = "1" if app else ""
        took = suite_seconds(name, args.tests, "-p", "no:xdist", "-p", "layers_timing", *extra, suite=suite,
                             output=output)
        print(f"  suite {'with' if app else 'without'} the session fixture {' '.join(extra)}: {took:.1f} s",
              flush=True)
        return took

    try:
        seconds(False, "--kvm-revert=never")  # warm-up
        plain = (seconds(False) - seconds(False, "--kvm-revert=never")) / (args.tests - 1)
        times.unlink(missing_ok=True)
        output: list[str] = []
        layered_run = seconds(True, output=output)
        notes = [json.loads(line) for line in times.read_text().splitlines()]
        layered = (layered_run - seconds(True, "--kvm-revert=never")) / (args.tests - 1)
        first_run, second_run = kept_runs(conn, name, args.tests, suite, times)
    finally:
        remove(conn, image)
    setup = next(n["setup"] for n in notes if "setup" in n)
    torn = next(n["app_torn_down"] for n in notes if "app_torn_down" in n)
    end = max(n["test_finished"] for n in notes if "test_finished" in n)
    found = CHECKPOINTS.search("\n".join(output))
    if found is None or found.group(1) != "1":
        raise SystemExit("the layered run was to take exactly one checkpoint:\n" + "\n".join(output[-20:]))
    rows = {
        "per test, plain baseline (no session fixture)": plain,
        "per test, reverting to the session fixture's layer": layered,
        "one checkpoint (the layer taken, once per run)": float(found.group(2)),
        "the layer's end (revert down, layer deleted)": end - torn,
        "the session fixture's setup (once with layers; per test without)": setup,
        "until the first test, @guest_setup, first run (runs it, keeps it)": first_run,
        "until the first test, @guest_setup, second run (reuses it)": second_run,
    }
    accelerator = "KVM" if domain_type(conn, build_image()) == "kvm" else "TCG (no working KVM here)"
    print(f"== Debian 12, 512 MiB, {accelerator}, {args.tests} SSH tests")
    for label, value in rows.items():
        print(f"  {label:66}{value:8.3f} s")
    print(f"  ratio layered / plain per test: {layered / plain:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
