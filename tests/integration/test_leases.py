"""The run's lease on the hypervisor, between runs on different hosts, on a real guest.

Two host identities on one machine (``KVMSNAP_HOST_ID``) with separate lock
directories are two CI runners that share nothing but the hypervisor: what keeps
them apart is the lease.  A runner that stops renewing (SIGSTOP: a powered-off
machine that may come back) loses the guest once its lease expires, and the next
run takes it over and recovers it like a dead local run's.  CI runs this file on
``qemu:///system`` and on a session daemon reached over SSH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import RealGuest, run_inner
from tests.integration.test_parallel import exclusive_tests
from tests.integration.test_semantics import CLEAN, assert_as_found

EXPIRY = "--kvm-lease-expiry=8"  # the shortest allowed: renewals every 2 s
Spawn = Callable[..., "subprocess.Popen[bytes]"]


def stalled_runner(inner: pytest.Pytester, spawn: Spawn, guest: RealGuest, locks: Path,
                   monkeypatch: pytest.MonkeyPatch) -> subprocess.Popen[bytes]:
    """A run on host runner-a that damages the guest mid-test and is then stopped (SIGSTOP).

    Its test goes on once the file ``wake`` appears, so a test can resume it.
    """
    inner.makepyfile(test_stalled=f"""
        import os, time, pytest
        @pytest.mark.kvm_snapshot("{guest.name}")
        def test_stalled(sh):
            sh.check("echo damage > /data/marker; echo damage > /tmp/marker")
            open("dirty-now", "w").close()
            while not os.path.exists("wake"):
                time.sleep(0.1)
    """)
    monkeypatch.setenv("KVMSNAP_HOST_ID", "runner-a")
    run = spawn("stalled", f"--kvm-lock-dir={locks}", EXPIRY)
    deadline = time.monotonic() + 120
    while not (inner.path / "dirty-now").exists():
        assert time.monotonic() < deadline and run.poll() is None, (inner.path / "stalled.out").read_text()
        time.sleep(0.1)
    os.kill(run.pid, signal.SIGSTOP)  # no renewals from now on, and no exit either
    (inner.path / "test_stalled.py").unlink()  # the runs that follow collect only their own tests
    return run


def wake(inner: pytest.Pytester, run: subprocess.Popen[bytes]) -> str:
    """Resume the stopped runner and let its test end; its output."""
    (inner.path / "wake").touch()
    os.kill(run.pid, signal.SIGCONT)
    run.wait(120)
    return (inner.path / "stalled.out").read_text()


def test_a_runner_that_stops_renewing_loses_the_guest_to_the_next_host(
        inner: pytest.Pytester, guest_a: RealGuest, spawn: Spawn, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    stalled = stalled_runner(inner, spawn, guest_a, tmp_path / "a", monkeypatch)
    try:
        inner.makepyfile(test_next=f"""
            import pytest
            @pytest.mark.kvm_snapshot("{guest_a.name}")
            def test_clean(sh):
                assert sh.run("{CLEAN}").status == 0
        """)
        monkeypatch.setenv("KVMSNAP_HOST_ID", "runner-b")
        result = run_inner(inner, f"--kvm-lock-dir={tmp_path / 'b'}", EXPIRY)
    finally:
        out = wake(inner, stalled)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        f"*guest '{guest_a.name}' is in use by run * (pid {stalled.pid} on runner-a), its lease on the hypervisor "
        "until *UTC; waiting",
        f"kvmsnap: {guest_a.name}: restored to kvmsnap-* left by dead run * and deleted 1 orphan snapshot(s)"])
    # The runner that woke up is fenced off: it neither reverted the guest nor deleted anything.
    assert stalled.returncode != 0
    assert f"lease on guest '{guest_a.name}' at " in out and "is lost: " in out, out
    assert "nothing of it is touched again" in out
    assert_as_found(guest_a)


def test_two_hosts_taking_over_one_expired_lease_take_turns(
        inner: pytest.Pytester, guest_a: RealGuest, spawn: Spawn, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both wait for the stalled runner's lease to expire, then race for it: one takes the
    guest over and recovers it, the other waits for that one.  The tests prove no overlap:
    each finds the guest clean and its marker never overwritten while it runs."""
    stalled = stalled_runner(inner, spawn, guest_a, tmp_path / "a", monkeypatch)
    try:
        inner.makepyfile(exclusive_tests(guest_a.name, n=2, pause=1.0))
        takers = []
        for host in ("runner-b", "runner-c"):
            monkeypatch.setenv("KVMSNAP_HOST_ID", host)
            takers.append(spawn(host, f"--kvm-lock-dir={tmp_path / host}", EXPIRY))
        codes = [taker.wait(180) for taker in takers]
    finally:
        wake(inner, stalled)
    outs = [(inner.path / f"{host}.out").read_text() for host in ("runner-b", "runner-c")]
    assert codes == [0, 0], outs
    recovered = [out for out in outs if "left by dead run" in out]
    assert len(recovered) == 1, outs  # exactly one took the guest over from the stalled runner
    assert all("on runner-a), its lease on the hypervisor until" in out for out in outs)
    assert_as_found(guest_a)


def test_a_run_longer_than_its_lease_keeps_the_guest_by_renewing(inner: pytest.Pytester,
                                                                 guest_a: RealGuest) -> None:
    """Two xdist workers over 16 s of tests on an 8 s lease: renewals from each worker."""
    inner.makepyfile(exclusive_tests(guest_a.name, n=8, pause=2.0))
    result = run_inner(inner, "-n", "2", EXPIRY)
    result.assert_outcomes(passed=8)
    assert_as_found(guest_a)
