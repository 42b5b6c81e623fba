"""Once per guest and run: the baseline snapshot, or in clone mode the copies and a clone.

Each step writes the run record first and then changes the guest, so a lock
directory that cannot hold the record stops the run with the guest untouched,
and nothing is ever on a guest that no record or ownership record names.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

from pytest_kvmsnap import resident
from pytest_kvmsnap.engine import Machine, Snapshot, owned_snapshots, snapshot_owner
from pytest_kvmsnap.events import BaselineTaken, Notice, Reporter
from pytest_kvmsnap.exceptions import KvmSnapError, RevertFailed, UnsupportedGuest
from pytest_kvmsnap.guest import GuestState
from pytest_kvmsnap.heartbeat import RunLeases
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.lease import Lease
from pytest_kvmsnap.locking import GuestLock, RecordStore
from pytest_kvmsnap.ownership import clone_name
from pytest_kvmsnap.readiness import poll
from pytest_kvmsnap.records import RunRecord
from pytest_kvmsnap.recovery import Recovery
from pytest_kvmsnap.revert import remember_loaded

AGENT_WAIT = 5.0  # seconds the agent gets to answer before a baseline goes without its resident process
SNAPSHOT_PREFIX = "kvmsnap-"  # a run's baseline: kvmsnap-<run id>

T = TypeVar("T")
Incident = Callable[[str, "RunRecord | None"], None]  # record an event of the run (in ``record``)


class Provisioner:
    def __init__(self, hypervisor: Hypervisor, lease: Lease, leases: RunLeases, recovery: Recovery,
                 store: RecordStore, incident: Incident, report: Reporter,
                 residents: frozenset[str] = frozenset()) -> None:
        self.hypervisor = hypervisor
        self.lease = lease
        self.leases = leases
        self.report = report
        self.recovery = recovery
        self.store = store
        self.owner = lease.owner
        self.incident = incident
        # (uri, domain) whose baseline step failed here: this run's snapshot may
        # still be on it (libvirt finished it after the call failed); see drop_failed()
        self.failed: set[tuple[str, str]] = set()
        self.residents = residents  # guests whose baseline holds a resident settle process (resident.py)

    @property
    def snapshot_name(self) -> str:
        return f"{SNAPSHOT_PREFIX}{self.owner.run_id}"

    def _new_record(self, uri: str, name: str, clone_of: str = "") -> RunRecord:
        """This run's record for guest ``name``, its owner's identity in it (the pid and what
        tells that process apart from a later one with the same pid)."""
        owner = self.owner
        return RunRecord(uri, name, owner.run_id, owner.pid, owner.host, owner.started, self.snapshot_name, None,
                         clone_of=clone_of, owner_proc=owner.proc)

    # --- the baseline --------------------------------------------------------

    def take_baseline(self, state: GuestState) -> RunRecord:
        """The run's first use of the guest (under its lock): repair, snapshot, record."""
        record = self._new_record(state.uri, state.name, clone_of=state.clone_of)
        try:
            machine, snap = self._recorded(state.lock, record, lambda: self._start_clone(state)
                                       if state.clone_of else self._snapshot(state, record))
        except Exception:
            # A clone that failed to start is destroyed on the spot; a guest is given back now.
            if not state.clone_of:
                self._stop_resident(state, record)
                if not self._give_back(state):
                    self.failed.add((state.uri, state.name))
            raise
        except BaseException:  # interrupted: the run's end does it (drop_failed, release_left)
            if not state.clone_of:
                self.failed.add((state.uri, state.name))
            raise
        record.clean_at = record.baseline
        record.settle_pending = True  # the first test waits for the guest like any later one
        record.settle_restored = bool(state.clone_of)  # a clone was started from the snapshot
        remember_loaded(record, machine, snap)  # this QEMU process took it: it may load it in place
        self.report(BaselineTaken(state.name, record.baseline, record.baseline_seconds))
        return record

    @staticmethod
    def _agent_answers(machine: Machine) -> bool:
        """Whether the agent answers within AGENT_WAIT seconds: a guest that recovery just restored has it
        back about a second after the load (readiness.py); a guest without its channel is not asked."""
        return machine.has_agent() and poll(lambda: machine.agent_answers(timeout=1),
                                            time.monotonic() + AGENT_WAIT, every=0.1)

    def _stop_resident(self, state: GuestState, record: RunRecord) -> None:
        """The resident settle process started for a baseline that failed: stopped, best effort
        (else it exits by itself after guestside.RESIDENT_IDLE seconds)."""
        started = resident.Resident.from_record(record.resident)
        if started is not None:
            with contextlib.suppress(KvmSnapError, self.hypervisor.kind.refusal):
                resident.stop(self.hypervisor.machine(state.name, state.uri), started)

    def _give_back(self, state: GuestState) -> bool:
        """After a failed baseline, the guest as found at once: this run's snapshot deleted (libvirt
        may have finished it after the call failed) and its lease given back, so that other runs
        need not wait for this run's end.  False if that failed too (drop_failed tries again then)."""
        try:
            with self.hypervisor.errors(state.uri, f"giving {state.name!r} back after its failed baseline"):
                self._delete_own_snapshots(state.name, state.uri)
                self.leases.release(state.uri, state.name)
        except KvmSnapError:
            return False
        return True

    def _recorded(self, lock: GuestLock, record: RunRecord, step: Callable[[], T]) -> T:
        """Write ``record``, then run ``step`` (timed into it); drop the record if it fails.

        Written before anything changes: a lock directory that cannot hold the
        record (full, read-only) stops the run here, with the guest untouched and
        no snapshot or copy that no record names.
        """
        lock.write(record)
        start = time.perf_counter()
        try:
            result = step()
        except BaseException:
            lock.remove()
            raise
        record.baseline_seconds = time.perf_counter() - start
        return result

    def _snapshot(self, state: GuestState, record: RunRecord) -> tuple[Machine, Snapshot]:
        def repair_and_take() -> Snapshot:  # every step is safe to repeat
            machine = self.hypervisor.machine(state.name, state.uri)
            for repaired in self.recovery.repair(state.name, machine, state.uri):
                self.incident(repaired, record)
            if state.name in self.residents and not record.resident:  # just before: in the snapshot
                started = resident.start(machine) if self._agent_answers(machine) else None
                record.resident = started.as_record() if started is not None else []
            return self._create(state.name, state.uri)

        snap = self.hypervisor.retrying(f"taking the baseline snapshot of {state.name!r}", repair_and_take,
                                        state.uri)
        return self.hypervisor.machine(state.name, state.uri), snap

    def _create(self, name: str, uri: str) -> Snapshot:
        """Take this run's baseline of ``name``, or adopt the one an interrupted call left."""
        machine = self.hypervisor.machine(name, uri)
        left = machine.find_snapshot(self.snapshot_name)
        snap = self._adopt(name, uri, machine, left) if left is not None else None
        if snap is None:
            snap = machine.take_baseline(self.snapshot_name, self.owner)
        self.lease.keep_or_back_off(name, uri, snap)
        return snap

    def _adopt(self, name: str, uri: str, machine: Machine, snap: Snapshot) -> Snapshot | None:
        """This run's snapshot is already there: an earlier call lost its connection
        while libvirt went on and finished it.  Nothing used the guest since (that
        test errored in setup), so a complete one is the baseline; else retake it.
        """
        owner = snapshot_owner(snap)
        if owner is None or owner.run_id != self.owner.run_id:
            delete = self.hypervisor.kind.advice.delete_snapshot(uri, name, snap.name)
            raise KvmSnapError(f"guest {name!r} has a snapshot {snap.name!r} that this run did not "
                               f"create; rename or delete it ({delete})")
        machine.resume_if_paused_by_snapshot()
        if not machine.is_running() or machine.holds_memory(snap.name):
            self.report(Notice(f"kvmsnap: {name}: using baseline {snap.name} that the hypervisor "
                               "finished after the connection was lost"))
            return snap
        machine.delete_snapshot(snap)
        return None

    def _delete_own_snapshots(self, name: str, uri: str) -> None:
        machine = self.hypervisor.machine(name, uri)
        for owner, snap in owned_snapshots(machine):
            if owner.run_id == self.owner.run_id:
                machine.delete_snapshot(snap)

    def drop_failed(self) -> list[str]:
        """Delete this run's snapshots that failed baseline steps left, found by run id.

        Unless a later step of this run took the guest (its record is then this
        run's, and the finisher restores the guest and deletes the snapshot).
        """
        problems = []
        for uri, name in sorted(self.failed):
            lock = self.store.lock(uri, name)
            try:
                record = lock.acquire(self.lease.lock_timeout, self.report)
                if record is not None and record.run_id == self.owner.run_id:
                    continue
                with self.hypervisor.errors(uri, f"removing this run's snapshot of {name!r}"):
                    self._delete_own_snapshots(name, uri)
            except KvmSnapError as exc:
                problems.append(f"{name}: {exc}")
            finally:
                lock.release()
        return problems

    # --- clone mode (see clones.py) ------------------------------------------

    def clone_source(self, name: str, slot: int, uri: str) -> str:
        """Copy guest ``name`` once per run, under its lock; return clone ``slot``'s name.

        The original's record stays as the run's lease on it until the finisher
        has removed the clones and the copies.
        """
        machine = self.hypervisor.machine(name, uri)
        self.hypervisor.engine(uri).clones.check_copyable(machine)
        lock = self.store.lock(uri, name)
        try:
            self.lease.hold(lock, name, lambda: self._new_clone_source(name, machine, lock))
            # Every process with a clone keeps the original's lease alive: it covers the
            # clones too, which another host's recovery would otherwise count as orphans.
            self.leases.adopt(lock.uri, name)
        finally:
            lock.release()
        return clone_name(name, self.owner.run_id, slot)

    def _new_clone_source(self, name: str, machine: Machine, lock: GuestLock) -> RunRecord:
        # Its baseline is the snapshot inside the copies; the original keeps none.
        record = self._new_record(lock.uri, name)
        self._recorded(lock, record, lambda: self._copy_original(name, machine, record))
        lock.write(record)  # now with the copies' whereabouts
        return record

    def _copy_original(self, name: str, machine: Machine, record: RunRecord) -> None:
        uri = record.uri
        for repaired in self.recovery.repair(name, machine, uri):
            self.incident(repaired, record)
        if not machine.is_running():
            raise UnsupportedGuest(f"guest {name!r} is shut off; --kvm-clones needs a running or "
                                   "paused guest (clones start from its memory). Start it, or drop --kvm-clones.")
        snap = self._create(name, uri)
        try:
            record.clone_source = self.hypervisor.engine(uri).clones.make_source(machine, snap, self.owner)
        finally:
            machine.delete_snapshot(snap)  # the copies hold it; the original is as found

    def _start_clone(self, state: GuestState) -> tuple[Machine, Snapshot]:
        source = self.store.lock(state.uri, state.clone_of).read()
        if source is None or source.clone_source is None:
            raise RevertFailed(f"the run's copies of {state.clone_of!r} are gone; cannot clone it")
        return self.hypervisor.engine(state.uri).clones.make_clone(source.clone_source, state.clone_of, state.name,
                                                            self.owner)
