"""The lease on a guest: one run, then one process of it, at a time.

Runs that share a lock directory are kept out by the lock and the run record
(``locking.py``).  Runs that do not (another user's lock directory, another
host on a remote hypervisor) are kept out by what they leave on the guest
itself: a live run's baseline snapshot, its *rival* baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_kvmsnap import backend
from pytest_kvmsnap.events import Waiting
from pytest_kvmsnap.exceptions import LeaseTimeout
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.locking import GuestLock, RunRecord, running

if TYPE_CHECKING:
    import libvirt

RIVAL_POLL = 2.0  # seconds between looks at a guest another lock directory's run holds
Rival = tuple[backend.Owner, str]  # the other run, and its baseline snapshot on the guest


def alive(owner: backend.Owner) -> bool:
    """Is the run that owns a snapshot alive? One on another host counts as alive."""
    return running(owner.host, owner.pid, owner.proc)


def may_use(record: RunRecord | None, run_id: str) -> bool:
    """A guest's record lets run ``run_id`` in: free, its own, or left by a dead run
    (whose orphans the baseline step repairs)."""
    return record is None or record.run_id == run_id or not record.owner_alive()


class Outraced(Exception):
    """Another run took a baseline of the guest at the same moment, and is older."""

    def __init__(self, rival: Rival) -> None:
        super().__init__(rival[1])
        self.rival = rival


class Lease:
    def __init__(self, hypervisor: Hypervisor, owner: backend.Owner, lock_timeout: float) -> None:
        self.hypervisor = hypervisor
        self.owner = owner
        self.lock_timeout = lock_timeout

    def may_use(self, record: RunRecord | None) -> bool:
        return may_use(record, self.owner.run_id)

    def hold(self, lock: GuestLock, name: str, take: Callable[[], RunRecord], rivals: bool = True,
             check: Callable[[], None] | None = None) -> RunRecord:
        """Hold ``lock`` with this run's record in it, calling ``take`` for a new run.

        Returns with the lock held; raises with it released.
        """
        deadline = time.monotonic() + self.lock_timeout
        report = self.hypervisor.report
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            record = lock.acquire(remaining, report, admit=self.may_use, check=check)
            if record is not None and record.run_id == self.owner.run_id:
                return record
            try:
                rival = self.rival(name) if rivals else None
                if rival is None:
                    return take()
            except Outraced as exc:
                rival = exc.rival
            except BaseException:
                lock.release()  # nothing is held on a failed path
                raise
            lock.release()
            self._wait_for(name, rival, deadline)

    def rival(self, name: str) -> Rival | None:
        """The oldest other live run whose baseline snapshot is on the guest."""
        rivals = [(owner, snap.getName())
                  for owner, snap in backend.owned_snapshots(self.hypervisor.domain(name))
                  if owner.run_id != self.owner.run_id and alive(owner)]
        return min(rivals, key=lambda r: (r[0].started, r[0].run_id), default=None)

    def keep_or_back_off(self, name: str, snap: libvirt.virDomainSnapshot) -> None:
        """Two runs that share no lock directory took baselines at once: the older run
        keeps the guest; this one deletes its snapshot, backs off and waits."""
        rival = self.rival(name)
        if rival is not None and (rival[0].started, rival[0].run_id) < (self.owner.started, self.owner.run_id):
            backend.delete_snapshot(snap)
            raise Outraced(rival)

    def _wait_for(self, name: str, rival: Rival, deadline: float) -> None:
        owner, snapshot = rival
        who = (f"run {owner.run_id} (pid {owner.pid} on {owner.host}, which keeps its locks elsewhere; "
               f"seen by its baseline snapshot {snapshot!r} on the guest)")
        if time.monotonic() >= deadline:
            raise LeaseTimeout(
                f"gave up after {self.lock_timeout:.0f} s waiting for guest {name!r}: held by {who}. "
                f"If that run is gone, run pytest --kvm-cleanup on {owner.host} or delete the snapshot "
                f"(virsh snapshot-delete {name} {snapshot}); else raise --kvm-lock-timeout"
            )
        self.hypervisor.report(Waiting(f"kvmsnap: guest {name!r} is in use by {who}; waiting"))
        time.sleep(min(RIVAL_POLL, max(0.0, deadline - time.monotonic())))
