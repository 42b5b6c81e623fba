"""Who may use a guest now: file locks and the run records beside them.

Per guest (URI + domain) the lock directory holds:

* ``<key>.lock`` -- a ``filelock.FileLock`` (flock).  A process holds it for a
  whole unit, so one worker of one run uses the guest at a time.  The kernel
  drops it when the holder dies, so a crashed worker never leaves it held.
* ``<key>.json`` -- the run record, read and written only under the lock: which
  run owns the guest (its id, owner pid, host, start), the baseline snapshot,
  which snapshot the guest is exactly at (``clean_at``; ``null`` = dirty), who
  holds the lock and on which test.  Workers of one run share the baseline and the dirty state
  through it; another run waits until the owner's record is gone (the *lease*),
  or takes over when the owner is dead (orphan).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pytest_kvmsnap.events import Notice, Reporter, Waiting
from pytest_kvmsnap.exceptions import ConfigError, LeaseTimeout, LockDirError
from pytest_kvmsnap.records import HISTORY, RunRecord, load_record

USE_LOCK = ".in-use.lock"  # see RecordStore._in_use

__all__ = ["GuestLock", "LeaseTimeout", "LockDirError", "RecordStore"]


def default_lock_dir() -> Path:
    """Per user, never world-writable: $XDG_RUNTIME_DIR, else /tmp/pytest-kvmsnap-<uid>."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "pytest-kvmsnap"
    return Path(tempfile.gettempdir()) / f"pytest-kvmsnap-{os.getuid()}"


def prepare_lock_dir(path: Path, shared: bool) -> Path:
    """Create the directory, refusing symlinks and (unless shared) others' directories."""
    if path.is_symlink():
        raise ConfigError(f"lock directory {path} is a symlink; point kvm_lock_dir at a real directory")
    try:
        path.mkdir(mode=0o2770 if shared else 0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create lock directory {path}: {exc}; set --kvm-lock-dir") from None
    info = path.lstat()
    if not shared and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise ConfigError(
            f"lock directory {path} is writable by others or not yours; "
            "use a private directory, or a shared one given with --kvm-lock-dir"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"lock directory {path} is not writable; set --kvm-lock-dir")
    return path


def lock_key(uri: str, domain: str) -> str:
    """A filesystem-safe, collision-free name for (URI, domain)."""
    digest = hashlib.sha256(f"{uri}\0{domain}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", domain)[:40]
    return f"{readable}-{digest}"


class GuestLock:
    def __init__(self, directory: Path, uri: str, domain: str,
                 warn: Callable[[str], None] = lambda _text: None) -> None:
        key = lock_key(uri, domain)
        self.uri, self.domain = uri, domain
        self.warn = warn
        self.name_path = directory / f"{key}.guest"
        self.record_path = directory / f"{key}.json"
        self.history_path = directory / f"{key}.history"
        self._lock = FileLock(str(directory / f"{key}.lock"))

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self, timeout: float, report: Reporter,
                admit: Callable[[RunRecord | None], bool] = lambda _record: True,
                check: Callable[[], None] | None = None) -> RunRecord | None:
        """Take the lock once ``admit`` accepts the run record; return that record.

        Two waits share this one loop: for the flock (another process is in a
        unit now) and for the lease (the record belongs to another live run,
        which keeps the guest between its units).  Both report the holder.
        ``check`` is asked while the flock is busy and may end the wait by raising.
        """
        self._name_the_lock()
        deadline = time.monotonic() + timeout
        wait = 0.0  # first try without blocking, so a wait is reported at once
        while True:
            try:
                self._lock.acquire(timeout=min(wait, max(0.0, deadline - time.monotonic())))
            except Timeout:
                record, wait = self.read(), 1.0 if check else 5.0
                if check is not None:
                    check()  # may raise: waiting is pointless (deadlock.py)
            except OSError as exc:  # the lock file itself cannot be created
                raise LockDirError(f"cannot create the lock for guest {self.domain!r} in "
                                   f"{self.record_path.parent}: {exc.strerror or exc}. "
                                   "Point --kvm-lock-dir at a writable directory.") from None
            else:
                record = self.read()
                if admit(record):
                    return record
                self._lock.release(force=True)  # not ours to use yet: wait for the lease to end
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            holder = record.describe() if record else "another process (no record yet)"
            if time.monotonic() >= deadline:
                raise LeaseTimeout(f"gave up after {timeout:.0f} s waiting for the guest lock; held by "
                                   f"{holder}; raise --kvm-lock-timeout or try later") from None
            report(Waiting(f"kvmsnap: guest {self.domain!r} is in use by {holder}; waiting"))

    def _name_the_lock(self) -> None:
        """Beside the lock file, which guest it is for: its name is a hash, and ``--kvm-cleanup``
        must know which lock files belong to guests that no longer exist."""
        if self.name_path.exists():
            return
        tmp = self.name_path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"uri": self.uri, "domain": self.domain}))
            tmp.replace(self.name_path)
        except OSError:  # a full directory fails at the lock or record itself, with the reason
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)

    def read(self) -> RunRecord | None:
        return load_record(self.record_path, self.warn)

    def write(self, record: RunRecord) -> None:
        assert self.held, "the run record is only written under the lock"
        # A record is a promise that its baseline exists (or is being taken):
        # one without a baseline would let a test use the guest unprotected.
        assert record.baseline, "a run record always names its baseline"
        tmp = self.record_path.with_suffix(f".{os.getpid()}.tmp")
        data = asdict(record)
        for name in (*HISTORY, "history_saved"):
            del data[name]  # the record stays small: rewriting it is O(1), not O(tests so far)
        try:
            self._append_history(record)
            tmp.write_text(json.dumps(data))
            tmp.replace(self.record_path)  # atomic: readers never see half a record
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LockDirError(
                f"cannot write the run record for guest {self.domain!r} in {self.record_path.parent}: "
                f"{exc.strerror or exc}. Free space there or point --kvm-lock-dir elsewhere."
            ) from None

    def _append_history(self, record: RunRecord) -> None:
        """Append the record's new reverts and waits (one JSON line each) to its history file."""
        lines: list[str] = []
        for name in HISTORY:
            new: list[Any] = getattr(record, name)[record.history_saved.get(name, 0):]
            lines.extend(json.dumps([name, list(entry)]) + "\n" for entry in new)
        if lines:
            with open(self.history_path, "a") as history:
                history.write("".join(lines))
        record.history_saved = {name: len(getattr(record, name)) for name in HISTORY}

    def load_history(self, record: RunRecord) -> RunRecord:
        """``record`` with every revert, wait and checkpoint of its run, all processes' (for the summary)."""
        reverts: list[tuple[float, str, str, str]] = []
        waits: list[tuple[float, tuple[str, ...]]] = []
        checkpoints: list[tuple[float, str]] = []
        with contextlib.suppress(OSError):
            for line in self.history_path.read_text().splitlines():
                with contextlib.suppress(ValueError, TypeError):
                    name, entry = json.loads(line)
                    if name == "reverts" and len(entry) == 4:
                        reverts.append((float(entry[0]), str(entry[1]), str(entry[2]), str(entry[3])))
                    elif name == "waits" and len(entry) == 2 and isinstance(entry[1], list):
                        waits.append((float(entry[0]), tuple(str(step) for step in entry[1])))
                    elif name == "checkpoints" and len(entry) == 2:
                        checkpoints.append((float(entry[0]), str(entry[1])))
        record.reverts, record.waits, record.checkpoints = reverts, waits, checkpoints
        record.history_saved = {name: len(getattr(record, name)) for name in HISTORY}
        return record

    def remove(self, lock_file: bool = False) -> None:
        """Drop the run record; with ``lock_file``, the lock file too.

        Only for names no process will lock again (a clone's, which holds its
        run's id): deleting a lock file someone may still wait on would let two
        processes hold "the" lock at once, on two different files.
        """
        self.record_path.unlink(missing_ok=True)
        self.history_path.unlink(missing_ok=True)
        if lock_file:
            Path(self._lock.lock_file).unlink(missing_ok=True)
            self.name_path.unlink(missing_ok=True)

    @staticmethod
    def records(directory: Path, warn: Callable[[str], None] = lambda _text: None) -> list[RunRecord]:
        return [r for r in (load_record(path, warn) for path in sorted(directory.glob("*.json"))) if r is not None]


class RecordStore:
    """One lock directory: a guest's lock and record by (URI, domain), and all records.

    A lock directory may be shared by several users: a record is trusted to
    *wait* for its run (anyone's), but only records in files of this user are
    ever a reason to revert or delete anything (:meth:`own_records`).
    """

    def __init__(self, directory: Path, report: Reporter | None = None) -> None:
        self.directory = directory
        self.report = report
        self._warned: set[str] = set()
        self._use: int | None = None  # fd of the directory's use lock, held shared while this store is open

    def _in_use(self) -> None:
        """Every process that locks guests here holds the directory's use lock shared: a lock
        file is only ever deleted under it exclusively, so no process can wait on a file
        that is then deleted and recreated (two holders of one guest)."""
        if self._use is None:
            try:
                # Read-only is enough for flock, so other users of a shared directory can open it too.
                self._use = os.open(self.directory / USE_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
            except OSError:
                return  # the guest locks themselves say why the directory is unusable
            fcntl.flock(self._use, fcntl.LOCK_SH)

    def close(self) -> None:
        if self._use is not None:
            os.close(self._use)  # releases the use lock
            self._use = None

    def remove_unused_locks(self, uri: str, exists: Callable[[str], bool], dry_run: bool) -> list[str]:
        """Lock files (and names) of guests at ``uri`` that no longer exist: removed when no other
        process uses this directory, listed otherwise."""
        self._in_use()
        gone = []
        for name_path in sorted(self.directory.glob("*.guest")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                named = json.loads(name_path.read_text())
                if named["uri"] == uri and not exists(str(named["domain"])):
                    gone.append(str(named["domain"]))
        if not gone or dry_run:
            return [f"{domain}: would remove its lock file (the guest no longer exists)" for domain in gone]
        try:
            if self._use is None:
                raise BlockingIOError
            fcntl.flock(self._use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return [f"{len(gone)} lock file(s) of guests that no longer exist left alone: another run uses "
                    f"{self.directory}"]
        try:
            for domain in gone:
                GuestLock(self.directory, uri, domain).remove(lock_file=True)
        finally:
            fcntl.flock(self._use, fcntl.LOCK_SH)
        return [f"{domain}: removed its lock file (the guest no longer exists)" for domain in gone]

    def warn(self, text: str) -> None:
        """One line per problem, not one per read of the same damaged file."""
        if text not in self._warned and self.report is not None:
            self._warned.add(text)
            self.report(Notice(text))

    def lock(self, uri: str, domain: str) -> GuestLock:
        self._in_use()
        return GuestLock(self.directory, uri, domain, self.warn)

    def records(self) -> list[RunRecord]:
        return GuestLock.records(self.directory, self.warn) if self.directory.is_dir() else []

    def own_records(self, run_id: str) -> list[RunRecord]:
        """Run ``run_id``'s records in files this user wrote; another user's claiming it is ignored."""
        found = []
        for record in self.records():
            if record.run_id != run_id:
                continue
            path = GuestLock(self.directory, record.uri, record.domain).record_path
            try:
                mine = path.stat().st_uid == os.getuid()
            except OSError:
                continue
            if mine:
                found.append(record)
            else:
                self.warn(f"kvmsnap: ignoring run record {path}: it claims this run but another user wrote it")
        return found
