"""The promise on every path, on a real guest: the two stories that broke it on main.

1. Markers added from a conftest hook (pytest's documented way to mark a
   directory) were ignored: tests ran on a dirty guest, silently.
2. libvirtd restarted while the baseline snapshot was being written: a test ran
   with no baseline, later tests failed with a cached error, the snapshot stayed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import INNER_CONFTEST, RealGuest, run_inner
from tests.integration.test_semantics import CLEAN, assert_as_found

REPO = Path(__file__).resolve().parents[2]

# Three tests with no marker of their own: each needs the guest clean, then dirties it.
UNMARKED = f"""
import pytest
@pytest.mark.parametrize("i", [1, 2, 3])
def test_each_starts_clean(i, sh):
    assert sh.run("{CLEAN}").status == 0, "previous test's disk or RAM marker survived"
    sh.check("echo {{i}} > /data/marker; echo {{i}} > /tmp/marker")
"""


@pytest.mark.parametrize("hook", [
    "def pytest_collection_modifyitems(items):\n    for item in items:\n        item.add_marker(MARK)",
    "def pytest_itemcollected(item):\n    item.add_marker(MARK)",
], ids=["collection_modifyitems", "itemcollected"])
def test_marker_added_by_a_conftest_hook(inner: pytest.Pytester, guest_a: RealGuest, hook: str) -> None:
    inner.makeconftest(INNER_CONFTEST + f"\nMARK = pytest.mark.kvm_snapshot({guest_a.name!r})\n" + hook)
    inner.makepyfile(UNMARKED)
    result = run_inner(inner)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"{guest_a.name}: baseline kvmsnap-* 3 revert(s)*"])
    assert_as_found(guest_a)


def restart_libvirtd() -> None:
    """SIGTERM libvirtd, as an admin's restart does, and start it again."""
    pid = int(Path("/var/run/libvirtd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        time.sleep(0.01)
    subprocess.run(["bash", str(REPO / "scripts/setup-host.sh")], check=True, stdout=subprocess.DEVNULL)


TEN_SLOW_TESTS = f"""
import time, pytest
@pytest.mark.kvm_snapshot("{{name}}")
@pytest.mark.parametrize("i", range(10))
def test_each_starts_clean(i, sh):
    assert sh.run("{CLEAN}").status == 0, "previous test's disk or RAM marker survived"
    sh.check(f"echo {{{{i}}}} > /data/marker; echo {{{{i}}}} > /tmp/marker")
    time.sleep(0.2)
"""


def test_libvirtd_restarted_while_the_baseline_is_written(inner, guest_a: RealGuest, spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Killed the moment the run record appears (it is written just before the snapshot):
    the plugin reconnects, adopts or retakes its baseline, and every test runs protected."""
    # ~80 MB of non-zero guest RAM (its /tmp holds ~110) stretch the savevm: the kill lands inside it.
    guest_a.console.check("yes abcdefghijklmnop | head -c 80000000 > /tmp/fill 2>/dev/null; true", timeout=120)
    locks = tmp_path / "locks"
    inner.makepyfile(TEN_SLOW_TESTS.format(name=guest_a.name))
    try:
        run = spawn("run", f"--kvm-lock-dir={locks}", "-v")
        deadline = time.monotonic() + 60
        while not list(locks.glob("*.json")):
            assert time.monotonic() < deadline and run.poll() is None, (inner.path / "run.out").read_text()
            time.sleep(0.002)
        restart_libvirtd()
        assert run.wait(180) == 0, (inner.path / "run.out").read_text()
    finally:
        guest_a.console.run("rm -f /tmp/fill", timeout=60)
    out = (inner.path / "run.out").read_text()
    assert "10 passed" in out, out
    assert "lost the connection to libvirtd" in out or "reconnected to" in out, out
    assert "qcow2" not in out and "no snapshot named ''" not in out, out
    assert not list(locks.glob("*.json")), "a run record was left"
    assert_as_found(guest_a)
