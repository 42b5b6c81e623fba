"""This process's hold on its guests: each prepared once, then locked and leased
while a unit uses it, released at the unit's end.

A guest is prepared on first use (its host chosen in a pool, the engine asked
whether it can serve the run, in clone mode this process's clone made) and a
guest that failed a once-per-guest step fails every later test fast.  Holding
it takes the lock and, for the run's first holder, the baseline
(``provisioning.py``).  No pytest here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from pytest_kvmsnap import deadlock
from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.engine import Machine, refusal
from pytest_kvmsnap.exceptions import (
    ConfigError,
    ConnectionFailed,
    ConnectionLost,
    Deadlock,
    KvmSnapError,
    LeaseLost,
)
from pytest_kvmsnap.guest import GuestState
from pytest_kvmsnap.heartbeat import RunLeases
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.lease import Lease
from pytest_kvmsnap.locking import RecordStore
from pytest_kvmsnap.placement import Probe, place, worker_slot
from pytest_kvmsnap.provisioning import Incident, Provisioner
from pytest_kvmsnap.records import RunRecord

T = TypeVar("T")

# Failures that say nothing lasting about a guest: never cached as its verdict.
TRANSIENT = (ConnectionLost, ConnectionFailed)


class Holder:
    def __init__(self, settings: Settings, hypervisor: Hypervisor, store: RecordStore, lease: Lease,
                 leases: RunLeases, provisioner: Provisioner, incident: Incident, *,
                 clone_slot: int | None, worker: str) -> None:
        self.settings = settings
        self.hypervisor = hypervisor
        self.store = store
        self.lease = lease
        self.leases = leases
        self.provisioner = provisioner
        self.incident = incident
        self.clone_slot = clone_slot  # clone mode: which of the run's clones this process uses
        self.worker = worker
        self.states: dict[str, GuestState] = {}  # by the name tests use (a clone's source's)
        self._failures: dict[str, KvmSnapError] = {}

    def first_use(self, name: str, step: Callable[[], T]) -> T:
        """Run a once-per-guest step; a guest that failed one fails every later test fast.

        A lost or refused connection is not the guest's fault and may be over by
        the next test: it is not cached.
        """
        if name in self._failures:
            raise self._failures[name]
        try:
            return step()
        except TRANSIENT:
            raise
        except KvmSnapError as exc:
            self._failures[name] = exc
            raise

    def machine(self, state: GuestState) -> Machine:
        return self.hypervisor.machine(state.name, state.uri)

    def held_record(self) -> RunRecord | None:
        """The record of a guest this process holds now, if any (where run incidents go)."""
        held = [state.record for state in self.states.values() if state.lock.held and state.record]
        return held[0] if held else None

    def prepared(self, name: str) -> GuestState:
        """This process's state for guest ``name``, prepared once: its host chosen, the domain
        looked up and preflighted, and in clone mode the run's copies made and this process's
        clone named."""
        if name not in self.states:
            uri = self.first_use(name, lambda: self._host_for(name))
            self.first_use(name, lambda: self._check_engine(uri))
            self.first_use(name, lambda: self.hypervisor.machine(name, uri))
            real, slot = name, self.clone_slot
            if slot is not None:
                real = self.first_use(name, lambda: self.provisioner.clone_source(name, slot, uri))
            self.states[name] = GuestState(real, uri, self.store.lock(uri, real),
                                           clone_of=name if real != name else "")
        return self.states[name]

    def _check_engine(self, uri: str) -> None:
        """Refuse, before any guest is touched, a run the engine at ``uri`` cannot serve."""
        settings = self.settings
        why = refusal(self.hypervisor.engine(uri).capabilities(), clones=self.clone_slot is not None,
                      revert_method=settings.revert_method,
                      agent_required="on" in (settings.sync_clock, settings.reseed), wait=settings.wait.kind)
        if why:
            raise ConfigError(f"the hypervisor at {uri} cannot serve this run: {why}")

    def _host_for(self, name: str) -> str:
        """The hypervisor this process uses guest ``name`` on (placement.py); the one URI without a pool."""
        pool = self.settings.pool
        if len(pool) == 1:
            return pool[0]
        chosen = place(name, pool, worker_slot(self.worker), lambda uri: self._probe(name, uri))
        for line in chosen.skipped:
            self.incident(line, None)
        return chosen.uri

    def _probe(self, name: str, uri: str) -> Probe:
        try:
            self.hypervisor.machine(name, uri)
        except ConnectionFailed as exc:
            return Probe(uri, problem=f"it cannot be reached ({exc})")
        except KvmSnapError as exc:
            return Probe(uri, problem=str(exc))
        return Probe(uri, holder=self.lease.other_holder(uri, name, self.store.lock(uri, name).read()))

    def hold(self, state: GuestState, holder: str) -> float:
        """Hold the guest for this process (once it failed to, fail fast); the seconds spent
        waiting for it, apart from taking the baseline."""
        return self.first_use(state.test_name, lambda: self._acquire(state, holder))

    def _acquire(self, state: GuestState, holder: str) -> float:
        """Hold the guest for this process; the run's first holder takes the baseline."""
        start, baseline_seconds = time.perf_counter(), 0.0

        def take() -> RunRecord:
            nonlocal baseline_seconds
            taking = time.perf_counter()
            try:
                return self.provisioner.take_baseline(state)
            finally:
                baseline_seconds += time.perf_counter() - taking

        held = [other for other in self.states.values() if other is not state and other.lock.held]
        self._waiting_for(held, state.name)
        try:
            record = self.lease.hold(state.lock, state.name, take, rivals=not state.clone_of,  # a clone: ours alone
                                     check=(lambda: self._check_deadlock(state, held)) if held else None)
        finally:
            self._waiting_for(held, "")
        waited = time.perf_counter() - start - baseline_seconds
        if record.holder:
            # Our run's last holder never released: it died mid-unit (an xdist
            # worker crash), and the guest is in whatever state it left.
            record.revert_owed = True
            self.incident(f"kvmsnap: {state.name}: previous holder {record.holder} died; reverting", record)
        record.holder, record.holder_pid, record.since = holder, os.getpid(), time.time()
        if self.worker not in record.served:
            record.served.append(self.worker)
        try:
            if not state.clone_of:  # this process renews the run's lease on it too
                self.leases.adopt(state.uri, state.name)
            state.lock.write(record)
        except BaseException:
            state.lock.release()
            raise
        state.record = record
        return waited

    @staticmethod
    def _waiting_for(held: list[GuestState], name: str) -> None:
        """Say in the guests this process holds which guest it waits for ('' once it is done)."""
        for other in held:
            if other.record is not None:
                other.record.waiting_for = name
                other.lock.write(other.record)

    def _check_deadlock(self, state: GuestState, held: list[GuestState]) -> None:
        chain = deadlock.find_cycle(os.getpid(), state.name, self.store.records())
        if chain:
            raise Deadlock(deadlock.describe(state.name, [other.name for other in held], chain))

    def check_lease(self, state: GuestState) -> None:
        """A guest whose lease this run lost is another run's now: unusable for the rest of the run."""
        try:
            self.leases.check(state.uri, state.test_name)
        except LeaseLost as exc:
            state.broken = str(exc)
            raise

    def release(self, state: GuestState) -> None:
        if not state.lock.held:
            return
        try:
            if state.record is not None:
                state.record.holder = ""
                state.lock.write(state.record)
        except KvmSnapError:
            pass  # the lock dir filled up; the test that hit it already reported it
        finally:
            state.lock.release()

    def release_all(self) -> None:
        for state in self.states.values():
            self.release(state)
