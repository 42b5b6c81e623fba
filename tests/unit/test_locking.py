"""Lock names, lock directory checks and run records (no hypervisor needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_kvmsnap.events import Event, to_stdout
from pytest_kvmsnap.exceptions import ConfigError
from pytest_kvmsnap.locking import GuestLock, lock_key, prepare_lock_dir
from pytest_kvmsnap.processes import pid_alive
from pytest_kvmsnap.records import RunRecord


def test_lock_key_is_filesystem_safe_and_distinct() -> None:
    a = lock_key("qemu:///system", "../we<ird & 'name'; rm -rf /")
    assert "/" not in a and " " not in a and "<" not in a
    assert lock_key("qemu:///system", "web") != lock_key("qemu:///session", "web")


def test_private_dir_is_created_0700(tmp_path: Path) -> None:
    path = prepare_lock_dir(tmp_path / "locks", shared=False)
    assert path.stat().st_mode & 0o777 == 0o700


def test_symlinked_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "locks").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="is a symlink"):
        prepare_lock_dir(tmp_path / "locks", shared=False)


def test_world_writable_private_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks").chmod(0o777)
    with pytest.raises(ConfigError, match="writable by others"):
        prepare_lock_dir(tmp_path / "locks", shared=False)


def test_unwritable_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create lock directory"):
        prepare_lock_dir(Path("/proc/kvmsnap-locks"), shared=True)


def test_record_round_trip_and_listing(tmp_path: Path) -> None:
    lock = GuestLock(tmp_path, "test:///default", "g")
    lock.acquire(1, to_stdout)
    record = RunRecord("test:///default", "g", "run1", os.getpid(), "h", 1.0, "kvmsnap-run1", None)
    lock.write(record)
    lock.release()
    assert lock.read() == record
    assert GuestLock.records(tmp_path) == [record]


def test_lock_is_exclusive_across_processes_and_freed_by_death(tmp_path: Path) -> None:
    code = ("import sys, time; from pytest_kvmsnap.locking import GuestLock; "
            "l = GuestLock(__import__('pathlib').Path(sys.argv[1]), 'u', 'g'); l.acquire(5, print); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    lock = GuestLock(tmp_path, "u", "g")
    waited: list[Event] = []
    with pytest.raises(Exception, match="gave up after 0 s"):
        lock.acquire(0, waited.append)
    holder.kill()
    holder.wait()
    lock.acquire(5, waited.append)  # the kernel dropped the dead holder's lock
    assert lock.held
    lock.release()
    assert not pid_alive(holder.pid)
