"""The lease on a guest: one run, then one process of it, at a time.

Runs that share a lock directory are kept out by the lock and the run record
(``locking.py``).  Runs that do not (another user's lock directory, another
host on a remote hypervisor) are kept out by what is on the hypervisor: the
run's lease (``heartbeat.py``), which expires unless renewed, and a live run's
baseline snapshot on the guest, its *rival* baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pytest_kvmsnap.config import this_host
from pytest_kvmsnap.engine import Snapshot, owned_snapshots
from pytest_kvmsnap.events import Reporter, Waiting
from pytest_kvmsnap.exceptions import LeaseTimeout
from pytest_kvmsnap.heartbeat import RunLeases
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.locking import GuestLock
from pytest_kvmsnap.ownership import Owner
from pytest_kvmsnap.processes import running
from pytest_kvmsnap.records import RunRecord

RIVAL_POLL = 2.0  # seconds between looks at a guest another lock directory's run holds
Rival = tuple[Owner, str]  # the other run, and its baseline snapshot on the guest


def record_owner(record: RunRecord) -> Owner:
    return Owner(record.run_id, record.owner_pid, record.host, record.started, record.owner_proc)


class Outraced(Exception):
    """Another run took a baseline of the guest at the same moment, and is older."""

    def __init__(self, rival: Rival) -> None:
        super().__init__(rival[1])
        self.rival = rival


class Lease:
    def __init__(self, hypervisor: Hypervisor, owner: Owner, lock_timeout: float,
                 leases: RunLeases, report: Reporter) -> None:
        self.hypervisor = hypervisor
        self.report = report
        self.owner = owner
        self.lock_timeout = lock_timeout
        self.leases = leases

    def alive(self, owner: Owner, uri: str, guest: str) -> bool:
        """Is the run that owns something of ``guest`` (a snapshot, a clone, a record) alive?

        On this host its process tells.  On another host, its lease on the guest
        does: alive while it holds one that has not expired, so no host counts as
        alive for ever.
        """
        if owner.host == this_host():
            return running(owner.host, owner.pid, owner.proc)
        lease = self.leases.live_holder(uri, guest)
        return lease is not None and lease.holder.run_id == owner.run_id

    def may_use(self, record: RunRecord | None) -> bool:
        """A guest's record lets this run in: free, its own, or left by a dead run (whose
        orphans the baseline step repairs)."""
        return (record is None or record.run_id == self.owner.run_id
                or not self.alive(record_owner(record), record.uri, record.domain))

    def other_holder(self, uri: str, name: str, record: RunRecord | None) -> str:
        """Who else holds guest ``name`` at ``uri`` now, by its lease or the run ``record``; '' if no one."""
        lease = self.leases.live_holder(uri, name)
        if lease is not None:
            return lease.describe()
        if record is not None and not self.may_use(record):
            return record.describe()
        return ""

    def hold(self, lock: GuestLock, name: str, take: Callable[[], RunRecord], rivals: bool = True,
             check: Callable[[], None] | None = None) -> RunRecord:
        """Hold ``lock`` with this run's record in it, calling ``take`` for a new run.

        A new run first takes the guest's lease on the hypervisor (not a clone's:
        its original's covers it).  Returns with the lock held; raises with it released.
        """
        deadline = time.monotonic() + self.lock_timeout
        report = self.report
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            record = lock.acquire(remaining, report, admit=self.may_use, check=check)
            if record is not None and record.run_id == self.owner.run_id:
                return record
            try:
                holder = self.leases.take(lock.uri, name) if rivals else None
                rival = self.rival(name, lock.uri) if rivals and holder is None else None
                if holder is None and rival is None:
                    return take()
            except Outraced as exc:
                holder, rival = None, exc.rival
            except BaseException:
                lock.release()  # nothing is held on a failed path
                raise
            lock.release()
            if holder is not None:
                self._wait(name, holder.describe(), deadline,
                           "if that run is gone, the guest is taken over once its lease expired (a run that "
                           "waits longer does it, as does pytest --kvm-cleanup)")
            else:
                assert rival is not None, "waiting for someone"
                owner, snapshot = rival
                self._wait(name, f"run {owner.run_id} (pid {owner.pid} on {owner.host}, which keeps its locks "
                                 f"elsewhere; seen by its baseline snapshot {snapshot!r} on the guest)", deadline,
                           f"if that run is gone, run pytest --kvm-cleanup on {owner.host} or delete the snapshot "
                           f"({self.hypervisor.kind.advice.delete_snapshot(lock.uri, name, snapshot)})")

    def rival(self, name: str, uri: str) -> Rival | None:
        """The oldest other live run whose baseline snapshot is on the guest."""
        rivals = [(owner, snap.name)
                  for owner, snap in owned_snapshots(self.hypervisor.machine(name, uri))
                  if owner.run_id != self.owner.run_id and self.alive(owner, uri, name)]
        return min(rivals, key=lambda r: (r[0].started, r[0].run_id), default=None)

    def keep_or_back_off(self, name: str, uri: str, snap: Snapshot) -> None:
        """Two runs that share no lock directory took baselines at once: the older run
        keeps the guest; this one deletes its snapshot, backs off and waits."""
        rival = self.rival(name, uri)
        if rival is not None and (rival[0].started, rival[0].run_id) < (self.owner.started, self.owner.run_id):
            self.hypervisor.machine(name, uri).delete_snapshot(snap)
            raise Outraced(rival)

    def _wait(self, name: str, who: str, deadline: float, remedy: str) -> None:
        if time.monotonic() >= deadline:
            raise LeaseTimeout(f"gave up after {self.lock_timeout:.0f} s waiting for guest {name!r}: held by {who}. "
                               f"{remedy[0].upper()}{remedy[1:]}; else raise --kvm-lock-timeout")
        self.report(Waiting(f"kvmsnap: guest {name!r} is in use by {who}; waiting"))
        time.sleep(min(RIVAL_POLL, max(0.0, deadline - time.monotonic())))
