"""Baselines, units and reverts: the plugin's decisions, one guest at a time.

A *unit* is the group of tests that share a guest's state (one test, class,
module, package or the whole session, per ``scope``).  The manager reverts a
guest to the unit's baseline at the unit's edges as ``revert`` says, skips
reverts of a guest known to be clean, and at the end puts every guest back to
the state it was found in and deletes the run's own snapshot.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from pytest_kvmsnap import backend
from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.exceptions import KvmSnapError, RevertFailed
from pytest_kvmsnap.guest import Guest, GuestState, RevertEvent
from pytest_kvmsnap.markers import Spec

if TYPE_CHECKING:
    import libvirt

T = TypeVar("T")
# (kind, domain, snapshot, seconds, method, reason): how the plugin's hooks are fed.
Listener = Callable[[str, str, str, float, str, str], None]


class GuestManager:
    def __init__(self, settings: Settings, run_id: str) -> None:
        self.settings = settings
        self.run_id = run_id
        self.owner = backend.Owner(run_id, os.getpid(), socket.gethostname(), time.time())
        self.snapshot_name = f"{backend.PREFIX}{run_id}"
        self._connections: dict[str, libvirt.virConnect] = {}
        self._domains: dict[str, libvirt.virDomain] = {}
        self._states: dict[str, GuestState] = {}
        self._failures: dict[str, KvmSnapError] = {}
        self.listener: Listener | None = None

    # --- lookups -------------------------------------------------------------

    def connection(self, uri: str | None = None) -> libvirt.virConnect:
        uri = uri or self.settings.uri
        if uri not in self._connections:
            self._connections[uri] = backend.open_connection(uri)
        return self._connections[uri]

    def guest(self, name: str) -> Guest:
        """The guest ``name``, baselined on first use; errors are remembered."""
        state = self._states.get(name) or self._check(name, lambda: self._first_use(name))
        return Guest(state, self.connection(state.uri), self._domains[name], self._manual_revert)

    def _check(self, name: str, step: Callable[[], T]) -> T:
        """Run a first-use step; a guest that failed one fails every later test fast."""
        if name in self._failures:
            raise self._failures[name]
        try:
            return step()
        except KvmSnapError as exc:
            self._failures[name] = exc
            raise

    def _domain(self, name: str) -> libvirt.virDomain:
        """Look the domain up and preflight it once; before any snapshot is taken."""
        if name not in self._domains:
            conn = self.connection()
            dom = backend.lookup_domain(conn, name)
            backend.preflight(conn, dom)
            if self.settings.snapshot:
                backend.lookup_snapshot(dom, self.settings.snapshot)
            self._domains[name] = dom
        return self._domains[name]

    def _first_use(self, name: str) -> GuestState:
        conn = self.connection()
        dom = self._domain(name)
        identity = backend.process_identity(dom)
        start = time.perf_counter()
        snap = backend.create_baseline(dom, self.snapshot_name, self.owner)
        state = GuestState(name, conn.getURI(), snap.getName(),
                           baseline_seconds=time.perf_counter() - start, at=snap.getName())
        if identity is not None and backend.snapshot_state(snap) == "running":
            state.inplace_ok[snap.getName()] = identity
        self._states[name] = state
        if self.listener:
            self.listener("baseline", name, state.run_baseline, state.baseline_seconds, "", "")
        return state

    def states(self) -> Iterator[GuestState]:
        return iter(self._states.values())

    # --- units ---------------------------------------------------------------

    def start_test(self, spec: Spec, unit: str) -> None:
        """Before a test's fixtures: begin its unit on each guest, revert if due."""
        for name in spec.domains:
            if spec.snapshot and name not in self._states:
                # Before the baseline is taken, so the error lists only the user's snapshots.
                dom = self._check(name, lambda: self._domain(name))  # noqa: B023
                backend.lookup_snapshot(dom, spec.snapshot)
            self.guest(name)
            state = self._states[name]
            if state.broken:
                raise RevertFailed(f"guest {name!r} is unusable for the rest of this run: {state.broken}")
            if state.unit != unit:
                self._begin_unit(state, spec, unit)
            state.at = None  # dirty from the moment a test that uses it starts

    def _begin_unit(self, state: GuestState, spec: Spec, unit: str) -> None:
        baseline = spec.snapshot or state.run_baseline
        if spec.snapshot:
            backend.lookup_snapshot(self._domains[state.name], spec.snapshot)
        state.unit, state.unit_baseline, state.unit_revert = unit, baseline, spec.revert
        state.unit_failed = False
        before = spec.revert in ("before", "both") and state.at != baseline
        # A clean guest at another baseline (e.g. the test asked for snapshot=)
        # must be moved whatever the mode: the test asked for that state.
        if before or (state.at is not None and state.at != baseline):
            self._revert(state, baseline, f"before {unit}")

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
            if state is None or state.broken or next_units.get(name) == state.unit:
                continue
            try:
                self._end_unit(state)
            except KvmSnapError as exc:
                errors.append(str(exc))
        if errors:
            raise RevertFailed("; ".join(errors))

    def _end_unit(self, state: GuestState) -> None:
        mode, unit = state.unit_revert, state.unit
        state.unit = None
        due = mode in ("after", "both") or (mode == "on-failure" and state.unit_failed)
        if due and state.unit_baseline and state.at != state.unit_baseline:
            self._revert(state, state.unit_baseline, f"after {unit}")

    # --- reverting -----------------------------------------------------------

    def _manual_revert(self, state: GuestState, reason: str) -> None:
        self._revert(state, state.unit_baseline or state.run_baseline, reason)
        state.at = None  # the test goes on using it

    def _revert(self, state: GuestState, target: str, reason: str) -> None:
        dom = self._domains[state.name]
        snap = backend.lookup_snapshot(dom, target)
        method = self._choose_method(state, dom, snap)
        start = time.perf_counter()
        try:
            method = self._do_revert(state, dom, snap, method)
        except RevertFailed as exc:
            state.broken = str(exc)
            state.at = None
            raise
        self._record(state, RevertEvent(time.perf_counter() - start, method, target, reason))
        state.at = target

    def _record(self, state: GuestState, event: RevertEvent) -> None:
        state.reverts.append(event)
        if self.listener:
            self.listener("revert", state.name, event.target, event.seconds, event.method,
                          event.reason)

    def _choose_method(self, state: GuestState, dom: libvirt.virDomain,
                       snap: libvirt.virDomainSnapshot) -> str:
        if self.settings.revert_method == "libvirt":
            state.method_notes.setdefault(snap.getName(), "libvirt (chosen by kvm_revert_method)")
            return "libvirt"
        why = backend.inplace_possible(self.connection(state.uri), snap.getName())
        if why is None and backend.snapshot_state(snap) != "running":
            why = f"snapshot {snap.getName()!r} was taken while the guest was not running"
        if why is None and state.inplace_ok.get(snap.getName()) != backend.process_identity(dom):
            why = "QEMU was restarted or its devices changed since the snapshot was loaded"
        if why is None:
            return "inplace"
        state.method_notes.setdefault(snap.getName(), f"libvirt ({why})")
        return "libvirt"

    def _do_revert(self, state: GuestState, dom: libvirt.virDomain,
                   snap: libvirt.virDomainSnapshot, method: str) -> str:
        if method == "inplace":
            try:
                backend.revert_inplace(dom, snap.getName())
                state.method_notes.setdefault(snap.getName(), "inplace (QEMU loadvm)")
                return "inplace"
            except RevertFailed as exc:
                state.method_notes[snap.getName()] = f"libvirt (in-place load failed: {exc})"
                method = "libvirt-fallback"
        backend.revert_libvirt(dom, snap)
        # The new QEMU process was started from this snapshot: loading it again
        # in place is now safe, as long as the process stays the same.
        identity = backend.process_identity(dom)
        if identity is not None and backend.snapshot_state(snap) == "running":
            state.inplace_ok[snap.getName()] = identity
        return method

    # --- end of run ----------------------------------------------------------

    def finish(self) -> list[str]:
        """Put every guest back as found and drop the run's snapshots; report problems."""
        problems = []
        for state in self._states.values():
            try:
                self._restore(state)
            except Exception as exc:  # keep going: every other guest must be restored too
                problems.append(f"{state.name}: {exc}")
        for conn in self._connections.values():
            with contextlib.suppress(Exception):  # the daemon may be gone; nothing to release
                conn.close()
        self._connections.clear()
        return problems

    def _restore(self, state: GuestState) -> None:
        dom = self._domains[state.name]
        if state.at != state.run_baseline:
            snap = backend.lookup_snapshot(dom, state.run_baseline)
            method = self._choose_method(state, dom, snap)
            start = time.perf_counter()
            method = self._do_revert(state, dom, snap, method)
            self._record(state, RevertEvent(time.perf_counter() - start, method,
                                            state.run_baseline, "end of session"))
            state.at = state.run_baseline
            state.broken = None
        if not self.settings.keep_snapshot:
            backend.delete_snapshot(backend.lookup_snapshot(dom, state.run_baseline))
