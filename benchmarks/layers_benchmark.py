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
from pathlib import Path

import libvirt
from debian_benchmark import GUEST, remove, start_guest  # benchmarks/ is on sys.path when run as a script
from revert_benchmark import URI, suite_seconds

from pytest_kvmsnap.testing.guest import build_image, domain_type

HERE = Path(__file__).resolve().parent
CHECKPOINTS = re.compile(r"(\d+) checkpoint\(s\) of wider fixtures' state, median ([\d.]+) s")


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
