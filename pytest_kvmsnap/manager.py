"""Baselines, units and reverts: the plugin's decisions, one guest at a time.

A *unit* is the group of tests that share a guest's state (one test, class,
module, package or the whole session, per ``scope``).  A process holds the
guest's lock for a whole unit; at the unit's edges it reverts the guest to the
unit's baseline as ``revert`` says, skipping reverts of a guest known to be
clean.  The run's *finisher* (the single pytest process, or xdist's controller
once every worker is done) puts each guest back as it was found and deletes
the run's snapshot.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pytest_kvmsnap import backend
from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.exceptions import KvmSnapError, RevertFailed
from pytest_kvmsnap.guest import Guest, GuestState
from pytest_kvmsnap.locking import GuestLock, RunRecord, pid_alive
from pytest_kvmsnap.markers import Spec

if TYPE_CHECKING:
    import libvirt

T = TypeVar("T")
# (kind, domain, snapshot, seconds, method, reason): how the plugin's hooks are fed.
Listener = Callable[[str, str, str, float, str, str], None]


class GuestManager:
    def __init__(self, settings: Settings, run_id: str, lock_dir: Path, *, owner_pid: int | None = None,
                 finisher: bool = True, progress: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.run_id = run_id
        self.lock_dir = lock_dir
        self.owner = backend.Owner(run_id, owner_pid or os.getpid(), socket.gethostname(), time.time())
        self.finisher = finisher
        self.progress = progress
        self.listener: Listener | None = None
        self.finished: list[RunRecord] = []
        self.notes: list[str] = []
        self._connections: dict[str, libvirt.virConnect] = {}
        self._domains: dict[tuple[str, str], libvirt.virDomain] = {}
        self._states: dict[str, GuestState] = {}
        self._failures: dict[str, KvmSnapError] = {}

    # --- lookups -------------------------------------------------------------

    def connection(self, uri: str | None = None) -> libvirt.virConnect:
        uri = uri or self.settings.uri
        if uri not in self._connections:
            self._connections[uri] = backend.open_connection(uri)
        return self._connections[uri]

    def guest(self, name: str) -> Guest:
        state = self._state(name)
        return Guest(state, self.connection(state.uri), self._domain(name), self._manual_revert)

    def _check(self, name: str, step: Callable[[], T]) -> T:
        """Run a first-use step; a guest that failed one fails every later test fast."""
        if name in self._failures:
            raise self._failures[name]
        try:
            return step()
        except KvmSnapError as exc:
            self._failures[name] = exc
            raise

    def _domain(self, name: str, uri: str | None = None) -> libvirt.virDomain:
        """Look the domain up and preflight it once, before any snapshot is taken."""
        uri = uri or self.settings.uri
        if (uri, name) not in self._domains:
            conn = self.connection(uri)
            dom = backend.lookup_domain(conn, name)
            backend.preflight(conn, dom)
            if self.settings.snapshot:
                backend.lookup_snapshot(dom, self.settings.snapshot)
            self._domains[uri, name] = dom
        return self._domains[uri, name]

    def _state(self, name: str) -> GuestState:
        if name not in self._states:
            self._check(name, lambda: self._domain(name))
            uri = self.settings.uri
            placeholder = RunRecord(uri, name, self.run_id, self.owner.pid, self.owner.host, 0.0, "", None)
            self._states[name] = GuestState(name, uri, GuestLock(self.lock_dir, uri, name), placeholder)
        return self._states[name]

    # --- the lease: one run, then one process of it, at a time ---------------

    def _may_use(self, record: RunRecord | None) -> bool:
        """Free, ours, or left by a dead run (whose orphans the baseline step repairs)."""
        return record is None or record.run_id == self.run_id or not record.owner_alive()

    def _acquire(self, state: GuestState, holder: str) -> None:
        record = state.lock.acquire(self.settings.lock_timeout, self.progress, admit=self._may_use)
        if record is None or record.run_id != self.run_id:
            record = self._take_baseline(state)
        elif record.holder:
            # Our run's last holder never released: it died mid-unit (an xdist
            # worker crash), and the guest is in whatever state it left.
            state.holder_died = True
            self.notes.append(f"kvmsnap: {state.name}: previous holder {record.holder} died; reverting")
        record.holder, record.since = holder, time.time()
        state.record = record
        state.lock.write(record)

    def _release(self, state: GuestState) -> None:
        if state.lock.held:
            state.record.holder = ""
            state.lock.write(state.record)
            state.lock.release()

    def _take_baseline(self, state: GuestState) -> RunRecord:
        dom = self._domain(state.name)
        self._recover_orphans(state.name, dom)
        identity = backend.process_identity(dom)
        start = time.perf_counter()
        snap = backend.create_baseline(dom, f"{backend.PREFIX}{self.run_id}", self.owner)
        seconds = time.perf_counter() - start
        record = RunRecord(state.uri, state.name, self.run_id, self.owner.pid, self.owner.host,
                           self.owner.started, snap.getName(), snap.getName(), baseline_seconds=seconds)
        if identity is not None and backend.snapshot_state(snap) == "running":
            record.inplace_ok[snap.getName()] = list(identity)
        if self.listener:
            self.listener("baseline", state.name, snap.getName(), seconds, "", "")
        return record

    def _recover_orphans(self, name: str, dom: libvirt.virDomain) -> None:
        """Snapshots of dead runs mean the guest was left mid-test: put it back, drop them."""
        orphans = []
        for snap in dom.listAllSnapshots():
            owner = backend.snapshot_owner(snap)
            if owner and owner.run_id != self.run_id and not _alive(owner):
                orphans.append((owner.started, owner, snap))
        if not orphans:
            return
        orphans.sort(key=lambda o: o[0])
        _, oldest, snap = orphans[0]
        backend.revert_libvirt(dom, snap)
        for _, _, orphan in orphans:
            backend.delete_snapshot(orphan)
        note = (f"kvmsnap: {name}: restored to {snap.getName()} left by dead run {oldest.run_id} "
                f"(pid {oldest.pid} on {oldest.host}) and deleted {len(orphans)} orphan snapshot(s)")
        self.notes.append(note)
        self.progress(note)

    # --- units ---------------------------------------------------------------

    def start_test(self, spec: Spec, unit: str, nodeid: str) -> None:
        """Before a test's fixtures: begin its unit on each guest, revert if due."""
        for name in sorted(spec.domains):  # one order everywhere: no lock-order deadlock
            state = self._state(name)
            if spec.snapshot and not state.lock.held:
                # Checked first, so the error lists only the user's snapshots.
                backend.lookup_snapshot(self._domain(name), spec.snapshot)
            if state.broken:
                raise RevertFailed(f"guest {name!r} is unusable for the rest of this run: {state.broken}")
            if not state.lock.held:
                self._check(name, lambda: self._acquire(state, nodeid))  # noqa: B023
            if state.unit != unit:
                self._begin_unit(state, spec, unit)
            state.at = None  # dirty from the moment a test that uses it starts

    def _begin_unit(self, state: GuestState, spec: Spec, unit: str) -> None:
        baseline = spec.snapshot or state.record.baseline
        state.unit, state.unit_baseline, state.unit_revert = unit, baseline, spec.revert
        state.unit_failed = False
        # "before"/"both" revert a dirty guest. A guest clean at another baseline
        # (the test asked for snapshot=), or left dirty by a process that died
        # mid-unit, is moved whatever the mode.
        before = spec.revert in ("before", "both") or state.holder_died
        if state.at != baseline and (before or state.at is not None):
            self._revert(state, baseline, f"before {unit}")
        state.holder_died = False

    def record_failure(self, domains: tuple[str, ...]) -> None:
        for name in domains:
            if name in self._states:
                self._states[name].unit_failed = True

    def end_test(self, spec: Spec, next_units: dict[str, str | None]) -> None:
        """After a test's fixtures are torn down: close the unit if it ends here.

        ``next_units`` maps each guest to the unit of the next test that uses it
        in this process (None when the next test does not use it).
        """
        errors = []
        for name in spec.domains:
            state = self._states.get(name)
            if state is None or not state.lock.held or next_units.get(name) == state.unit:
                continue
            try:
                self._end_unit(state)
            except KvmSnapError as exc:
                errors.append(str(exc))
            finally:
                self._release(state)
        if errors:
            raise RevertFailed("; ".join(errors))

    def _end_unit(self, state: GuestState) -> None:
        mode, unit = state.unit_revert, state.unit
        state.unit = None
        due = mode in ("after", "both") or (mode == "on-failure" and state.unit_failed)
        if due and not state.broken and state.unit_baseline and state.at != state.unit_baseline:
            self._revert(state, state.unit_baseline, f"after {unit}")

    # --- reverting -----------------------------------------------------------

    def _manual_revert(self, state: GuestState, reason: str) -> None:
        self._revert(state, state.unit_baseline or state.record.baseline, reason)
        state.at = None  # the test goes on using it

    def _revert(self, state: GuestState, target: str, reason: str) -> None:
        try:
            self._revert_record(state.record, self._domain(state.name), target, reason)
        except RevertFailed as exc:
            state.broken = str(exc)
            state.at = None
            raise
        state.at = target

    def _revert_record(self, record: RunRecord, dom: libvirt.virDomain, target: str, reason: str) -> None:
        snap = backend.lookup_snapshot(dom, target)
        method = self._choose_method(record, dom, snap)
        start = time.perf_counter()
        method = self._do_revert(record, dom, snap, method)
        seconds = time.perf_counter() - start
        record.reverts.append((seconds, method, target, reason))
        if self.listener:
            self.listener("revert", record.domain, target, seconds, method, reason)

    def _choose_method(self, record: RunRecord, dom: libvirt.virDomain,
                       snap: libvirt.virDomainSnapshot) -> str:
        name = snap.getName()
        if self.settings.revert_method == "libvirt":
            record.notes.setdefault(name, "libvirt (chosen by kvm_revert_method)")
            return "libvirt"
        why = backend.inplace_possible(dom.connect(), name)
        if why is None and backend.snapshot_state(snap) != "running":
            why = f"snapshot {name!r} was taken while the guest was not running"
        identity = backend.process_identity(dom)
        if why is None and (identity is None or record.inplace_ok.get(name) != list(identity)):
            why = "QEMU was restarted or its devices changed since the snapshot was loaded"
        if why is None:
            return "inplace"
        record.notes.setdefault(name, f"libvirt ({why})")
        return "libvirt"

    def _do_revert(self, record: RunRecord, dom: libvirt.virDomain,
                   snap: libvirt.virDomainSnapshot, method: str) -> str:
        name = snap.getName()
        if method == "inplace":
            try:
                backend.revert_inplace(dom, name)
                record.notes.setdefault(name, "inplace (QEMU loadvm)")
                return "inplace"
            except RevertFailed as exc:
                record.notes[name] = f"libvirt (in-place load failed: {exc})"
                method = "libvirt-fallback"
        backend.revert_libvirt(dom, snap)
        # The new QEMU process was started from this snapshot: loading it again
        # in place is now safe, as long as the process stays the same.
        identity = backend.process_identity(dom)
        if identity is not None and backend.snapshot_state(snap) == "running":
            record.inplace_ok[name] = list(identity)
        return method

    # --- end of run ----------------------------------------------------------

    def finish(self) -> list[str]:
        """Release this process's locks; as the finisher, restore guests and drop snapshots."""
        for state in self._states.values():
            self._release(state)
        problems = []
        if self.finisher and self.lock_dir.is_dir():
            for record in GuestLock.records(self.lock_dir):
                if record.run_id == self.run_id:
                    problems.extend(self._finish_guest(record))
        for conn in self._connections.values():
            with contextlib.suppress(Exception):  # the daemon may be gone; nothing to release
                conn.close()
        self._connections.clear()
        return problems

    def _finish_guest(self, record: RunRecord) -> list[str]:
        lock = GuestLock(self.lock_dir, record.uri, record.domain)
        try:
            record = lock.acquire(self.settings.lock_timeout, self.progress) or record
            dom = self._domain(record.domain, record.uri)
            if record.at != record.baseline:
                self._revert_record(record, dom, record.baseline, "end of session")
                record.at = record.baseline
            if not self.settings.keep_snapshot:
                backend.delete_snapshot(backend.lookup_snapshot(dom, record.baseline))
            lock.remove()
            return []
        except Exception as exc:  # keep going: every other guest must be restored too
            # The record stays: the next run sees a dead owner and restores the guest.
            return [f"{record.domain}: {exc}"]
        finally:
            self.finished.append(record)
            lock.release()


def _alive(owner: backend.Owner) -> bool:
    return owner.host != socket.gethostname() or pid_alive(owner.pid)

