"""--kvm-cleanup: orphans of dead runs are repaired; live runs' and users' snapshots are not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_kvmsnap.events import to_stdout
from pytest_kvmsnap.libvirt.leases import LibvirtLeases
from pytest_kvmsnap.libvirt.machine import LibvirtMachine
from pytest_kvmsnap.libvirt.snapshots import DomainSnapshots
from pytest_kvmsnap.locking import GuestLock
from pytest_kvmsnap.ownership import LeaseRecord, Owner
from pytest_kvmsnap.records import RunRecord
from tests.conftest import TestDriver


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plugin_snapshot(testdriver: TestDriver, name: str, run: str, pid: int) -> None:
    owner = Owner(run, pid, os.uname().nodename, time.time())
    LibvirtMachine(testdriver.conn.lookupByName(name)).take_baseline(f"kvmsnap-{run}", owner)


@pytest.fixture
def guest(testdriver: TestDriver) -> str:
    name = testdriver.define()
    testdriver.conn.lookupByName(name).snapshotCreateXML("<domainsnapshot><name>mine</name></domainsnapshot>")
    plugin_snapshot(testdriver, name, "deadrun", dead_pid())
    plugin_snapshot(testdriver, name, "liverun", os.getpid())
    return name


def cleanup(pytester: pytest.Pytester, guest: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest("--kvm-uri=test:///default", f"--kvm-domain={guest}",
                              f"--kvm-lock-dir={pytester.path / 'locks'}", "--kvm-cleanup", *args)


def test_dry_run_lists_and_changes_nothing(pytester: pytest.Pytester, testdriver: TestDriver, guest: str) -> None:
    result = cleanup(pytester, guest, "--kvm-dry-run")
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "kvmsnap cleanup at test:///default (dry run: nothing is changed)",
        f"  {guest}: kvmsnap-liverun belongs to live run liverun (pid {os.getpid()} *); left alone",
        f"  {guest}: would restore the guest to kvmsnap-deadrun and delete orphan snapshot(s) kvmsnap-deadrun",
    ])
    assert testdriver.snapshots(guest) == ["kvmsnap-deadrun", "kvmsnap-liverun", "mine"]


def test_cleanup_removes_only_dead_runs_snapshots(pytester: pytest.Pytester, testdriver: TestDriver,
                                                  guest: str) -> None:
    result = cleanup(pytester, guest)
    assert result.ret == 0
    result.stdout.fnmatch_lines([f"*{guest}: restored to kvmsnap-deadrun left by dead run deadrun*"
                                 "deleted 1 orphan snapshot(s)"])
    assert testdriver.snapshots(guest) == ["kvmsnap-liverun", "mine"]
    assert "collected" not in result.stdout.str()  # no tests ran


def test_cleanup_removes_a_dead_runs_record(pytester: pytest.Pytester, testdriver: TestDriver) -> None:
    name = testdriver.define()
    locks = pytester.path / "locks"
    locks.mkdir(mode=0o700)
    lock = GuestLock(locks, "test:///default", name)
    lock.acquire(1, to_stdout)
    lock.write(RunRecord("test:///default", name, "deadrun", dead_pid(), os.uname().nodename, 1.0,
                         "kvmsnap-deadrun", None))
    lock.release()
    cleanup(pytester, name, "--kvm-dry-run").stdout.fnmatch_lines(
        [f"  {name}: would remove the record of dead run deadrun*"])
    assert lock.read() is not None
    cleanup(pytester, name).stdout.fnmatch_lines([f"  {name}: removed the record of dead run deadrun*"])
    assert lock.read() is None


def test_dry_run_alone_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--kvm-dry-run")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--kvm-dry-run only goes with --kvm-cleanup*"])


def test_unreachable_uri_is_one_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result = pytester.runpytest("--kvm-uri=qemu+unix:///system?socket=/nonexistent/sock", "--kvm-cleanup",
                                f"--kvm-lock-dir={tmp_path}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["kvmsnap: cannot open libvirt connection*libvirtd does not seem*"])


def run_without_waiting(pytester: pytest.Pytester, guest: str) -> pytest.RunResult:
    """One test on ``guest``, from a lock directory of its own, that will not wait for it."""
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot({guest!r})
        def test_one(kvm_guest):
            pass
    """)
    return pytester.runpytest("--kvm-uri=test:///default", "--kvm-lock-timeout=0",
                              f"--kvm-lock-dir={pytester.path / 'locks'}")


def test_live_run_of_another_lock_dir_keeps_the_guest(pytester: pytest.Pytester, testdriver: TestDriver) -> None:
    """A live run's baseline on the guest is a lease even without a shared lock directory."""
    name = testdriver.define()
    plugin_snapshot(testdriver, name, "otherrun", os.getpid())
    result = run_without_waiting(pytester, name)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*gave up after 0 s waiting for guest '{name}': held by run otherrun "
                                 f"(pid {os.getpid()} on *, which keeps its locks elsewhere; seen by its "
                                 "baseline snapshot 'kvmsnap-otherrun' on the guest). If that run is gone*"])
    assert testdriver.snapshots(name) == ["kvmsnap-otherrun"]


def test_two_runs_snapshotting_at_once_the_older_keeps_the_guest(
        pytester: pytest.Pytester, testdriver: TestDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: another lock directory's run takes its baseline just as this one does."""
    name = testdriver.define()
    real = DomainSnapshots.take_baseline

    def racing(machine, snapshot, owner):  # type: ignore[no-untyped-def]
        # An older live run snapshots the guest a moment before this run does,
        # through the real test driver, after this run looked and saw no one.
        if not machine.native.listAllSnapshots():
            real(machine, "kvmsnap-olderrun", Owner("olderrun", os.getpid(), owner.host, 1.0))
        return real(machine, snapshot, owner)

    monkeypatch.setattr(DomainSnapshots, "take_baseline", racing)  # the inner run is in this process
    result = run_without_waiting(pytester, name)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*held by run olderrun*seen by its baseline snapshot 'kvmsnap-olderrun'*"])
    assert testdriver.snapshots(name) == ["kvmsnap-olderrun"]  # this run backed off and deleted its own


def test_cleanup_removes_lock_files_of_guests_that_no_longer_exist_when_no_run_uses_them(
        pytester: pytest.Pytester, testdriver: TestDriver) -> None:
    gone, kept = testdriver.define(), testdriver.define()
    locks = pytester.path / "locks"
    locks.mkdir(mode=0o700)
    for name in (gone, kept):
        lock = GuestLock(locks, "test:///default", name)
        lock.acquire(1, to_stdout)
        lock.release()
    other_uri = GuestLock(locks, "qemu:///system", gone)  # the same name at another URI: not ours to judge
    other_uri.acquire(1, to_stdout)
    other_uri.release()
    dom = testdriver.conn.lookupByName(gone)
    dom.destroy()
    dom.undefine()
    testdriver.names.remove(gone)
    files = sorted(p.name for p in locks.iterdir())  # the guests' .lock and .guest files
    cleanup(pytester, kept, "--kvm-dry-run").stdout.fnmatch_lines(
        [f"  {gone}: would remove its lock file (the guest no longer exists)"])
    assert sorted(p.name for p in locks.iterdir() if p.name != ".in-use.lock") == files
    # Another process uses the directory (a run that may be waiting on a lock file): left alone.
    user = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                             "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_SH); "
                             "print('held', flush=True); time.sleep(60)", str(locks / ".in-use.lock")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert user.stdout is not None and user.stdout.readline() == "held\n"
        cleanup(pytester, kept).stdout.fnmatch_lines(
            [f"  1 lock file(s) of guests that no longer exist left alone: another run uses {locks}"])
    finally:
        user.kill()
        user.wait()
    cleanup(pytester, kept).stdout.fnmatch_lines(
        [f"  {gone}: removed its lock file (the guest no longer exists)"])
    left = sorted(p.name for p in locks.iterdir())
    assert GuestLock(locks, "test:///default", gone).name_path.name not in left
    assert GuestLock(locks, "test:///default", kept).name_path.name in left
    assert other_uri.name_path.name in left


def remote_run(testdriver: TestDriver, guest: str, run: str, expires_in: float) -> None:
    """What a run on another host left: its baseline snapshot, and its lease expiring in ``expires_in`` s."""
    owner = Owner(run, 4242, "another-host", time.time())
    LibvirtMachine(testdriver.conn.lookupByName(guest)).take_baseline(f"kvmsnap-{run}", owner)
    LibvirtLeases(testdriver.conn).define(LeaseRecord(guest, owner, time.time() + expires_in))


def test_a_run_on_another_host_is_dead_once_its_lease_expired(pytester: pytest.Pytester,
                                                              testdriver: TestDriver) -> None:
    name = testdriver.define()
    remote_run(testdriver, name, "gone", expires_in=-1)
    cleanup(pytester, name, "--kvm-dry-run").stdout.fnmatch_lines([
        f"  {name}: would restore the guest to kvmsnap-gone and delete orphan snapshot(s) kvmsnap-gone",
        f"  {name}: would remove the lease of dead run gone"])
    result = cleanup(pytester, name)
    result.stdout.fnmatch_lines([
        f"  kvmsnap: {name}: restored to kvmsnap-gone left by dead run gone (pid 4242 on another-host) and deleted 1 "
        "orphan snapshot(s)",
        f"  {name}: removed the lease of dead run gone (pid 4242 on another-host)"])
    assert testdriver.snapshots(name) == []
    assert LibvirtLeases(testdriver.conn).read(name) is None


def test_a_run_on_another_host_with_a_live_lease_is_left_alone(pytester: pytest.Pytester,
                                                               testdriver: TestDriver) -> None:
    name = testdriver.define()
    remote_run(testdriver, name, "busy", expires_in=600)
    result = cleanup(pytester, name)
    result.stdout.fnmatch_lines([f"  {name}: kvmsnap-busy belongs to live run busy (pid 4242 on another-host); "
                                 "left alone"])
    assert testdriver.snapshots(name) == ["kvmsnap-busy"]
    found = LibvirtLeases(testdriver.conn).read(name)
    assert found is not None and found[1].holder.run_id == "busy"
    LibvirtLeases(testdriver.conn).release(found[0])
