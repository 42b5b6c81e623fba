"""Hostile input: another user's or a hand-edited run record, a forged claim on this run,
a damaged snapshot description -- ignored with one line, never a reason to revert or delete."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from pathlib import Path

import pytest

from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.engine import owned_snapshots
from pytest_kvmsnap.events import Event, Notice
from pytest_kvmsnap.finishing import Finisher
from pytest_kvmsnap.heartbeat import RunLeases
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.libvirt.machine import LibvirtMachine
from pytest_kvmsnap.locking import GuestLock, RecordStore
from pytest_kvmsnap.ownership import Owner
from pytest_kvmsnap.processes import process_token, running
from pytest_kvmsnap.records import RunRecord
from pytest_kvmsnap.revert import Reverter
from tests.conftest import TestDriver
from tests.unit.helpers import run_unit as run
from tests.unit.helpers import three_tests

NOBODY = 65534


def write_record(directory: Path, record: RunRecord, uid: int | None = None) -> Path:
    path = GuestLock(directory, record.uri, record.domain).record_path
    path.write_text(json.dumps(asdict(record)))
    if uid is not None:
        os.chown(path, uid, -1)
    return path


def test_a_record_claiming_this_run_written_by_another_user_is_ignored(tmp_path: Path) -> None:
    events: list[Event] = []
    store = RecordStore(tmp_path, events.append)
    forged = RunRecord("test:///default", "victim", "run1", os.getpid(), "h", 1.0, "kvmsnap-run1", None)
    path = write_record(tmp_path, forged, uid=NOBODY)
    assert store.own_records("run1") == []
    assert store.own_records("run1") == []  # read twice, said once
    assert events == [Notice(f"kvmsnap: ignoring run record {path}: it claims this run but another user wrote it")]
    os.chown(path, os.getuid(), -1)
    assert [r.domain for r in store.own_records("run1")] == ["victim"]


def test_the_finisher_reverts_and_deletes_only_a_snapshot_that_says_it_is_this_runs(
        tmp_path: Path, testdriver: TestDriver) -> None:
    """A record is a file; the snapshot's own description is what makes it the run's."""
    name = testdriver.define()
    dom = testdriver.conn.lookupByName(name)
    dom.snapshotCreateXML("<domainsnapshot><name>users-own</name></domainsnapshot>", 0)
    record = RunRecord("test:///default", name, "run1", os.getpid(), "h", 1.0, "users-own", None)
    write_record(tmp_path, record)
    settings = Settings(uri="test:///default")
    events: list[Event] = []
    hypervisor = Hypervisor(settings, events.append)
    finisher = Finisher(settings, hypervisor, Reverter(settings, events.append), RecordStore(tmp_path, events.append),
                        events.append)
    leases = RunLeases(hypervisor, Owner("run1", os.getpid(), "h", 1.0), settings.lease_expiry)
    assert leases.take("test:///default", name) is None  # the run's lease is no forgery
    problems = finisher.finish_run("run1", leases)
    leases.stop()
    assert problems == [f"{name}: its snapshot 'users-own' is not this run's (its description says someone "
                        "else); left alone"]
    assert testdriver.snapshots(name) == ["users-own"]
    assert not any(type(e).__name__ == "Reverted" for e in events)


def test_a_damaged_record_in_the_lock_dir_is_one_warning_and_the_run_goes_on(
        pytester: pytest.Pytester, testdriver: TestDriver, tmp_path: Path) -> None:
    name = testdriver.define()
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    path = GuestLock(locks, "test:///default", name).record_path
    path.write_text('{"uri": "test:///default", "domain": "' + name + '", "run_id": 7, "owner_pid": "x"')
    pytester.makepyfile(three_tests(name))
    result = run(pytester, f"--kvm-lock-dir={locks}")
    result.assert_outcomes(passed=3)
    assert "\n".join(result.outlines).count(f"kvmsnap: ignoring run record {path}: it is damaged") == 1
    assert testdriver.snapshots(name) == []


def test_a_damaged_ownership_record_makes_a_snapshot_the_users(pytester: pytest.Pytester,
                                                              testdriver: TestDriver) -> None:
    name = testdriver.define()
    dom = testdriver.conn.lookupByName(name)
    dom.snapshotCreateXML("<domainsnapshot><name>kvmsnap-x</name><description>pytest-kvmsnap baseline "
                          '{"owner": "pytest-kvmsnap", "run": "x", "pid": </description></domainsnapshot>', 0)
    assert owned_snapshots(LibvirtMachine(dom)) == []  # so no recovery or cleanup ever touches it
    pytester.makepyfile(three_tests(name))
    result = run(pytester)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"kvmsnap: {name}: snapshot kvmsnap-x has a damaged pytest-kvmsnap record in "
                                 "its description; it counts as yours and is left alone"])
    assert testdriver.snapshots(name) == ["kvmsnap-x"]


def test_a_dead_runs_pid_reused_by_another_process_is_not_its_owner(
        pytester: pytest.Pytester, testdriver: TestDriver) -> None:
    """The dead run's snapshot names a live pid (this process), but not this process's start."""
    name = testdriver.define()
    dom = testdriver.conn.lookupByName(name)
    token = process_token(os.getpid())
    assert token and running(socket.gethostname(), os.getpid(), token)
    reused = Owner("deadrun", os.getpid(), socket.gethostname(), 1.0, token.split(":")[0] + ":1")
    assert not running(reused.host, reused.pid, reused.proc)
    assert running(reused.host, reused.pid, "")  # an old record without a token: the pid decides
    LibvirtMachine(dom).take_baseline("kvmsnap-deadrun", reused)
    pytester.makepyfile(three_tests(name))
    result = run(pytester)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"kvmsnap: {name}: restored to kvmsnap-deadrun left by dead run deadrun *"])
    assert testdriver.snapshots(name) == []
