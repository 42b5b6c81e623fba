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
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pytest_kvmsnap import backend, clones
from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.exceptions import (
    ConfigError,
    ConnectionFailed,
    ConnectionLost,
    KvmSnapError,
    RevertFailed,
    UnsupportedGuest,
)
from pytest_kvmsnap.guest import Guest, GuestState
from pytest_kvmsnap.locking import GuestLock, LeaseTimeout, RunRecord, pid_alive
from pytest_kvmsnap.markers import Spec
from pytest_kvmsnap.units import reverts_at_end, reverts_at_start

if TYPE_CHECKING:
    import libvirt

T = TypeVar("T")
RIVAL_POLL = 2.0  # seconds between looks at a guest another lock directory's run holds
RECONNECT_TIMEOUT = 30.0  # seconds to wait for a restarted libvirtd to answer again
RECONNECT_POLL = 0.5
# Failures that say nothing lasting about a guest: never cached as its verdict.
TRANSIENT = (ConnectionLost, ConnectionFailed)
# (kind, domain, snapshot, seconds, method, reason): how the plugin's hooks are fed.
Listener = Callable[[str, str, str, float, str, str], None]


class GuestManager:
    def __init__(self, settings: Settings, run_id: str, lock_dir: Path, *, owner_pid: int | None = None,
                 finisher: bool = True, progress: Callable[[str], None] = print,
                 clone_slot: int | None = None) -> None:
        self.settings = settings
        self.clone_slot = clone_slot  # clone mode: which of the run's clones this process uses
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
        # (uri, domain) whose baseline step failed here: this run's snapshot may
        # still be on it (libvirt finished it after the call failed); see finish()
        self._failed_baselines: set[tuple[str, str]] = set()

    # --- lookups -------------------------------------------------------------

    def connection(self, uri: str | None = None) -> libvirt.virConnect:
        uri = uri or self.settings.uri
        if uri not in self._connections:
            self._connections[uri] = backend.open_connection(uri)
        return self._connections[uri]

    def _reconnect_if_lost(self) -> None:
        """A connection does not survive a libvirtd restart, but the guests' QEMU
        processes do: notice it (one cheap round trip) and open a new one."""
        for uri, conn in list(self._connections.items()):
            if not backend.is_alive(conn):
                self._reconnect(uri)

    def _reconnect(self, uri: str) -> None:
        """Drop the connection to ``uri`` and open a new one, waiting for libvirtd to answer."""
        self._drop_connection(uri)
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        while True:
            try:
                self.connection(uri)
                break
            except ConnectionFailed as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionFailed(f"the libvirt connection to {uri} was lost and libvirtd did not "
                                           f"answer again within {RECONNECT_TIMEOUT:.0f} s: {exc}") from None
                self.progress(f"kvmsnap: waiting for libvirtd at {uri} to answer again")
                time.sleep(RECONNECT_POLL)
        # Into a held guest's record, if any: xdist's controller prints those.
        held = [state.record for state in self._states.values() if state.lock.held and state.record]
        self._note(f"kvmsnap: reconnected to {uri}: the libvirt connection was lost "
                   "(libvirtd restarted?)", held[0] if held else None)

    def _retrying(self, action: str, step: Callable[[], T], uri: str | None = None) -> T:
        """Run ``step``; if libvirtd dropped the connection, reconnect and run it once more.

        ``step`` must be safe to run again: each caller looks up what it needs
        afresh, since objects from the lost connection are dead.
        """
        uri = uri or self.settings.uri
        try:
            with backend.libvirt_errors(uri, action):
                return step()
        except ConnectionLost as exc:
            self.progress(f"kvmsnap: {exc}; reconnecting and trying once more")
        self._reconnect(uri)
        with backend.libvirt_errors(uri, action):
            return step()

    def _drop_connection(self, uri: str) -> None:
        with contextlib.suppress(Exception):  # already broken; nothing to release
            self._connections.pop(uri).close()
        for key in [key for key in self._domains if key[0] == uri]:
            del self._domains[key]

    def _note(self, message: str, record: RunRecord | None = None) -> None:
        """A one-line event for the summary, shown at once as well.

        Events about a guest go into its run record, so that the summary, which
        xdist's controller prints, has the workers' events too.
        """
        (record.events if record is not None else self.notes).append(message)
        self.progress(message)

    def guest(self, name: str) -> Guest:
        state = self._state(name)
        return Guest(state, self.connection(state.uri), self._domain(state.name), self._manual_revert)

    def _check(self, name: str, step: Callable[[], T]) -> T:
        """Run a first-use step; a guest that failed one fails every later test fast.

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

    def _domain(self, name: str, uri: str | None = None) -> libvirt.virDomain:
        """Look the domain up and preflight it once, before any snapshot is taken."""
        uri = uri or self.settings.uri
        conn = self.connection(uri)  # first: a reconnect drops the cached domains
        if (uri, name) not in self._domains:
            dom = backend.lookup_domain(conn, name)
            backend.preflight(conn, dom)
            if self.settings.snapshot:
                backend.lookup_snapshot(dom, self.settings.snapshot)
            self._domains[uri, name] = dom
        return self._domains[uri, name]

    def _state(self, name: str) -> GuestState:
        """This process's view of guest ``name`` (in clone mode: of its clone of it)."""
        if name not in self._states:
            self._check(name, lambda: self._domain(name))
            real = name
            if self.clone_slot is not None:
                real = self._check(name, lambda: self._clone_source(name))
            uri = self.settings.uri
            self._states[name] = GuestState(real, uri, GuestLock(self.lock_dir, uri, real),
                                            clone_of=name if real != name else "")
        return self._states[name]

    # --- the lease: one run, then one process of it, at a time ---------------

    def _may_use(self, record: RunRecord | None) -> bool:
        """Free, ours, or left by a dead run (whose orphans the baseline step repairs)."""
        return record is None or record.run_id == self.run_id or not record.owner_alive()

    def _acquire(self, state: GuestState, holder: str) -> None:
        record = self._lease(state.lock, state.name, lambda: self._take_baseline(state),
                             rivals=not state.clone_of)  # a clone is this run's alone
        if record.holder:
            # Our run's last holder never released: it died mid-unit (an xdist
            # worker crash), and the guest is in whatever state it left.
            record.revert_owed = True
            self._note(f"kvmsnap: {state.name}: previous holder {record.holder} died; reverting", record)
        record.holder, record.since = holder, time.time()
        try:
            state.lock.write(record)
        except BaseException:
            state.lock.release()
            raise
        state.record = record

    def _lease(self, lock: GuestLock, name: str, take: Callable[[], RunRecord],
               rivals: bool = True) -> RunRecord:
        """Hold ``lock`` with this run's record in it, calling ``take`` for a new run.

        Runs that share this lock directory are kept out by the lock and the run
        record.  Runs that do not (another user's lock directory, another host
        on a remote hypervisor) are kept out by what they leave on the guest
        itself: a live run's baseline snapshot.
        """
        deadline = time.monotonic() + self.settings.lock_timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            record = lock.acquire(remaining, self.progress, admit=self._may_use)
            if record is not None and record.run_id == self.run_id:
                return record
            try:
                rival = self._rival(name) if rivals else None
                if rival is None:
                    return take()
            except _Outraced as exc:
                rival = exc.rival
            except BaseException:
                lock.release()  # nothing is held on a failed path
                raise
            lock.release()
            self._wait_for_rival(name, rival, deadline)

    def _rival(self, name: str) -> tuple[backend.Owner, str] | None:
        """The oldest other live run whose baseline snapshot is on the guest."""
        rivals = [(owner, snap.getName()) for owner, snap in backend.owned_snapshots(self._domain(name))
                  if owner.run_id != self.run_id and _alive(owner)]
        return min(rivals, key=lambda r: (r[0].started, r[0].run_id), default=None)

    def _wait_for_rival(self, name: str, rival: tuple[backend.Owner, str], deadline: float) -> None:
        owner, snapshot = rival
        who = (f"run {owner.run_id} (pid {owner.pid} on {owner.host}, which keeps its locks elsewhere; "
               f"seen by its baseline snapshot {snapshot!r} on the guest)")
        if time.monotonic() >= deadline:
            raise LeaseTimeout(
                f"gave up after {self.settings.lock_timeout:.0f} s waiting for guest {name!r}: held by {who}. "
                f"If that run is gone, run pytest --kvm-cleanup on {owner.host} or delete the snapshot "
                f"(virsh snapshot-delete {name} {snapshot}); else raise --kvm-lock-timeout"
            )
        self.progress(f"kvmsnap: guest {name!r} is in use by {who}; waiting")
        time.sleep(min(RIVAL_POLL, max(0.0, deadline - time.monotonic())))

    def _create_baseline(self, name: str) -> libvirt.virDomainSnapshot:
        """Take this run's baseline of ``name``, or adopt the one an interrupted call left."""
        dom = self._domain(name)
        snapshot = f"{backend.PREFIX}{self.run_id}"
        left = backend.find_snapshot(dom, snapshot)
        snap = self._adopt(name, dom, left) if left is not None else None
        if snap is None:
            snap = backend.create_baseline(dom, snapshot, self.owner)
        rival = self._rival(name)
        if rival is not None and (rival[0].started, rival[0].run_id) < (self.owner.started, self.run_id):
            # Two runs that share no lock directory took baselines at once: the
            # older run keeps the guest, this one backs off and waits for it.
            backend.delete_snapshot(snap)
            raise _Outraced(rival)
        return snap

    def _adopt(self, name: str, dom: libvirt.virDomain,
               snap: libvirt.virDomainSnapshot) -> libvirt.virDomainSnapshot | None:
        """This run's snapshot is already there: an earlier call lost its connection
        while libvirt went on and finished it.  Nothing used the guest since (that
        test errored in setup), so a complete one is the baseline; else retake it.
        """
        owner = backend.snapshot_owner(snap)
        if owner is None or owner.run_id != self.run_id:
            raise KvmSnapError(f"guest {name!r} has a snapshot {snap.getName()!r} that this run did not "
                               "create; rename or delete it (virsh snapshot-delete)")
        backend.resume_if_paused_by_snapshot(dom)
        if not dom.isActive() or backend.qemu_holds_vm_state(dom, snap.getName()):
            self.progress(f"kvmsnap: {name}: using baseline {snap.getName()} that libvirt finished "
                          "after the connection was lost")
            return snap
        backend.delete_snapshot(snap)
        return None

    def _release(self, state: GuestState) -> None:
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

    def _take_baseline(self, state: GuestState) -> RunRecord:
        name = f"{backend.PREFIX}{self.run_id}"
        record = RunRecord(state.uri, state.name, self.run_id, self.owner.pid, self.owner.host,
                           self.owner.started, name, None, clone_of=state.clone_of)
        try:
            dom, snap = self._recorded(state.lock, record, lambda: self._start_clone(state)
                                       if state.clone_of else self._snapshot(state, record))
        except BaseException:
            if not state.clone_of:  # a clone that failed to start is destroyed on the spot
                self._failed_baselines.add((state.uri, state.name))
            raise
        record.at = name
        identity = backend.process_identity(dom)
        if identity is not None and backend.snapshot_state(snap) == "running":
            record.inplace_ok[name] = list(identity)
        if self.listener:
            self.listener("baseline", state.name, name, record.baseline_seconds, "", "")
        return record

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

    def _snapshot(self, state: GuestState,
                  record: RunRecord) -> tuple[libvirt.virDomain, libvirt.virDomainSnapshot]:
        def repair_and_take() -> libvirt.virDomainSnapshot:  # both steps are safe to repeat
            for repaired in self._recover_orphans(state.name, self._domain(state.name)):
                self._note(repaired, record)
            return self._create_baseline(state.name)

        snap = self._retrying(f"taking the baseline snapshot of {state.name!r}", repair_and_take)
        return self._domain(state.name), snap

    # --- clone mode (see clones.py) ------------------------------------------

    def _clone_source(self, name: str) -> str:
        """Copy guest ``name`` once per run, under its lock; return this process's clone's name.

        The original's record stays as the run's lease on it until the finisher
        has removed the clones and the copies.
        """
        dom = self._domain(name)
        clones.check_local(self.connection())
        lock = GuestLock(self.lock_dir, self.settings.uri, name)
        try:
            self._lease(lock, name, lambda: self._new_clone_source(name, dom, lock))
        finally:
            lock.release()
        return clones.clone_name(name, self.run_id, self.clone_slot or 0)

    def _new_clone_source(self, name: str, dom: libvirt.virDomain, lock: GuestLock) -> RunRecord:
        # Its baseline is the snapshot inside the copies; the original keeps none.
        record = RunRecord(self.settings.uri, name, self.run_id, self.owner.pid, self.owner.host,
                           self.owner.started, f"{backend.PREFIX}{self.run_id}", None)
        self._recorded(lock, record, lambda: self._copy_original(name, dom, record))
        lock.write(record)  # now with the copies' whereabouts
        return record

    def _copy_original(self, name: str, dom: libvirt.virDomain, record: RunRecord) -> None:
        for repaired in self._recover_orphans(name, dom):
            self._note(repaired, record)
        if not dom.isActive():
            raise UnsupportedGuest(f"guest {name!r} is shut off; --kvm-clones needs a running or "
                                   "paused guest (clones start from its memory). Start it, or drop --kvm-clones.")
        snap = self._create_baseline(name)
        try:
            record.clone_source = clones.make_source(dom, snap, self.owner)
        finally:
            backend.delete_snapshot(snap)  # the copies hold it; the original is as found

    def _start_clone(self, state: GuestState) -> tuple[libvirt.virDomain, libvirt.virDomainSnapshot]:
        source = GuestLock(self.lock_dir, state.uri, state.clone_of).read()
        if source is None or source.clone_source is None:
            raise RevertFailed(f"the run's copies of {state.clone_of!r} are gone; cannot clone it")
        return clones.make_clone(self.connection(), source.clone_source, state.clone_of, state.name, self.owner)

    def _recover_orphans(self, name: str, dom: libvirt.virDomain) -> list[str]:
        """What dead runs left: put the guest back, drop their snapshots, clones and copies."""
        done = []
        orphans = self.orphans(dom)
        if orphans:
            oldest, snap = orphans[0]
            backend.revert_libvirt(dom, snap)  # the dead run left the guest mid-test
            for _, orphan in orphans:
                backend.delete_snapshot(orphan)
            done.append(f"kvmsnap: {name}: restored to {snap.getName()} left by dead run {oldest.run_id} "
                        f"(pid {oldest.pid} on {oldest.host}) and deleted {len(orphans)} orphan snapshot(s)")
        dead_clones, directories = self._orphan_clones(dom)
        for clone in dead_clones:
            clones.destroy(self.connection(), clone)
            # Its name holds the dead run's id: no one will lock it again.
            GuestLock(self.lock_dir, self.settings.uri, clone).remove(lock_file=True)
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)
        if dead_clones or directories:
            done.append(f"kvmsnap: {name}: removed {len(dead_clones)} clone(s) and {len(directories)} "
                        "copy director(ies) left by dead runs")
        return done

    def _dead_other(self, owner: backend.Owner) -> bool:
        """Was ``owner`` another run, now dead (so what it left is an orphan)?"""
        return owner.run_id != self.run_id and not _alive(owner)

    def _orphan_clones(self, dom: libvirt.virDomain) -> tuple[list[str], list[Path]]:
        return clones.orphans(self.connection(), dom, self._dead_other)

    def orphans(self, dom: libvirt.virDomain) -> list[tuple[backend.Owner, libvirt.virDomainSnapshot]]:
        """The guest's snapshots that dead runs of this plugin left, oldest first."""
        found = [(owner, snap) for owner, snap in backend.owned_snapshots(dom) if self._dead_other(owner)]
        return sorted(found, key=lambda pair: pair[0].started)

    def cleanup(self, name: str, dry_run: bool) -> list[str]:
        """``--kvm-cleanup``: repair one guest dead runs left, under its lock."""
        dom = backend.lookup_domain(self.connection(), name)
        lines = [f"{name}: {snap.getName()} belongs to live run {owner.run_id} "
                 f"(pid {owner.pid} on {owner.host}); left alone"
                 for owner, snap in backend.owned_snapshots(dom) if _alive(owner)]
        orphans = self.orphans(dom)
        dead_clones, directories = self._orphan_clones(dom)
        if dry_run:
            if orphans:
                names = ", ".join(snap.getName() for _, snap in orphans)
                lines.append(f"{name}: would restore the guest to {orphans[0][1].getName()} "
                             f"and delete orphan snapshot(s) {names}")
            lines.extend(f"{name}: would remove clone {clone}" for clone in dead_clones)
            lines.extend(f"{name}: would remove copies in {directory}" for directory in directories)
        elif orphans or dead_clones or directories:
            lock = GuestLock(self.lock_dir, self.settings.uri, name)
            lock.acquire(self.settings.lock_timeout, self.progress, admit=self._may_use)
            try:
                lines.extend(self._recover_orphans(name, dom))
            finally:
                lock.release()
        return lines or [f"{name}: nothing to clean"]

    def stale_records(self, dry_run: bool) -> list[str]:
        """Run records of dead runs whose guests had nothing left to repair."""
        lines = []
        for record in GuestLock.records(self.lock_dir) if self.lock_dir.is_dir() else []:
            if record.owner_alive():
                continue
            lines.append(f"{record.domain}: {'would remove' if dry_run else 'removed'} the record of "
                         f"dead run {record.run_id} (pid {record.owner_pid})")
            if not dry_run:
                lock = GuestLock(self.lock_dir, record.uri, record.domain)
                lock.acquire(self.settings.lock_timeout, self.progress, admit=self._may_use)
                lock.remove()
                lock.release()
        return lines

    # --- units ---------------------------------------------------------------

    def start_test(self, spec: Spec, unit: str, nodeid: str) -> None:
        """Before a test's fixtures: begin its unit on each guest, revert if due.

        Returns only with every guest protected (see :meth:`_check_protected`);
        anything else raises, and the test errors instead of running.
        """
        self._reconnect_if_lost()
        for name in sorted(spec.domains):  # one order everywhere: no lock-order deadlock
            with backend.libvirt_errors(self.settings.uri, f"preparing guest {name!r} for {nodeid}"):
                state = self._state(name)
                self._start_guest(state, spec, unit, nodeid)
            self._check_protected(state, unit)

    def _start_guest(self, state: GuestState, spec: Spec, unit: str, nodeid: str) -> None:
        name = state.clone_of or state.name
        if spec.snapshot and self.clone_slot is not None:
            raise ConfigError(f"snapshot={spec.snapshot!r} cannot be used with --kvm-clones: "
                              "clones start from the state the guest is found in")
        if spec.snapshot and not state.lock.held:
            # Checked first, so the error lists only the user's snapshots.
            backend.lookup_snapshot(self._domain(name), spec.snapshot)
        if state.broken:
            raise RevertFailed(f"guest {name!r} is unusable for the rest of this run: {state.broken}")
        if not state.lock.held:
            self._check(name, lambda: self._acquire(state, nodeid))
        if state.unit != unit:
            self._begin_unit(state, spec, unit)
        state.at = None  # dirty from the moment a test that uses it starts

    def _check_protected(self, state: GuestState, unit: str) -> None:
        """The promise, checked where every marked test starts.

        The guest is held by this process, the run's baseline is recorded, and
        the test's unit has begun (its start-of-unit revert done).  Anything else
        errors the test rather than let it run on an unprotected guest.
        """
        record = state.record
        if not state.lock.held:
            why = "this process does not hold its lock"
        elif record is None or not record.baseline or record.run_id != self.run_id:
            why = "this run has no baseline recorded for it"
        elif state.unit != unit or not state.unit_baseline:
            why = "its unit did not begin"
        else:
            return
        raise RevertFailed(f"guest {state.name!r} is not protected for this test ({why}); "
                           "the test is not run on it")

    def _begin_unit(self, state: GuestState, spec: Spec, unit: str) -> None:
        assert state.record is not None, "a unit begins on a held guest"
        baseline = spec.snapshot or state.record.baseline
        if reverts_at_start(spec.revert, state.at, baseline, owed=state.record.revert_owed):
            self._revert(state, baseline, f"before {unit}")
        state.record.revert_owed = False
        # Only now: a unit whose first revert failed has not begun, and its next
        # test must not find it begun (it would run on the unreverted guest).
        state.unit, state.unit_baseline, state.unit_revert = unit, baseline, spec.revert
        state.unit_failed = False

    def record_failure(self, domains: tuple[str, ...]) -> None:
        for name in domains:
            if name in self._states:
                self._states[name].unit_failed = True

    def end_test(self, spec: Spec, next_units: dict[str, str | None]) -> None:
        """After a test's fixtures are torn down: close the unit if it ends here.

        ``next_units`` maps each guest to the unit of the next test that uses it
        in this process (None when the next test does not use it).  Every guest
        whose unit ends is released, whatever fails on the way.
        """
        errors = []
        try:
            self._reconnect_if_lost()
        except KvmSnapError as exc:
            errors.append(str(exc))
        for name in spec.domains:
            state = self._states.get(name)
            if state is not None and state.lock.held:
                errors.extend(self._end_guest(state, next_units.get(name)))
        if errors:
            raise RevertFailed("; ".join(dict.fromkeys(errors)))

    def _end_guest(self, state: GuestState, next_unit: str | None) -> list[str]:
        """End the guest's unit if it ends here (or the guest went down); the errors."""
        errors = []
        try:
            with backend.libvirt_errors(state.uri, f"checking guest {state.name!r} after the test"):
                died = backend.crash_reason(self._domain(state.name))
                if died:  # the test errors; the guest is restored now, whatever the unit or mode
                    errors.append(f"guest {state.clone_of or state.name!r} went down during the test: {died}; "
                                  "it is being restored to its baseline for the next test")
                elif next_unit == state.unit:
                    return []  # the unit goes on: keep holding the guest
                self._end_unit(state, force=bool(died))
        except KvmSnapError as exc:
            # Whatever failed, the guest may be dirty: the unit is over, and the
            # record says a revert is owed, so the next unit reverts first.
            state.unit = None
            if state.record is not None:
                state.record.revert_owed = True
            errors.append(str(exc))
        finally:
            if state.unit is None:
                self._release(state)
        return errors

    def _end_unit(self, state: GuestState, force: bool = False) -> None:
        unit, baseline = state.unit, state.baseline
        state.unit = None
        if state.broken or not reverts_at_end(state.unit_revert, failed=state.unit_failed, forced=force):
            return
        if state.at != baseline:
            self._revert(state, baseline, f"after {unit}")

    # --- reverting -----------------------------------------------------------

    def _manual_revert(self, state: GuestState, reason: str) -> None:
        self._revert(state, state.baseline, reason)
        state.at = None  # the test goes on using it

    def _revert(self, state: GuestState, target: str, reason: str) -> None:
        """Revert, retrying once after a lost connection; on failure the record owes a revert."""
        record = state.record
        assert record is not None, "only a held guest is reverted"
        try:
            self._retrying(f"reverting {state.name!r} to {target!r}",
                           lambda: self._revert_record(record, self._domain(state.name), target, reason),
                           state.uri)
        except BaseException as exc:
            if isinstance(exc, RevertFailed):
                state.broken = str(exc)
            record.revert_owed = True
            state.at = None
            raise
        record.revert_owed = False
        state.at = target

    def _revert_record(self, record: RunRecord, dom: libvirt.virDomain, target: str, reason: str,
                       *, final: bool = False) -> None:
        snap = backend.lookup_snapshot(dom, target)
        why_not = self._why_not_inplace(record, dom, snap)
        if why_not and self.settings.revert_method == "inplace" and not final and dom.isActive():
            # Strict mode: the user asked never to pay for a QEMU restart between
            # tests.  A guest whose QEMU is gone needs one anyway, and the
            # end-of-session restore (final) may too: a guest left dirty is worse.
            raise RevertFailed(f"kvm_revert_method=inplace: cannot revert {record.domain!r} to "
                               f"{target!r} in place: {why_not}. Use --kvm-revert-method=auto "
                               "to fall back to libvirt's revert there.")
        if why_not:
            record.notes.setdefault(target, f"libvirt ({why_not})")
        start = time.perf_counter()
        method = self._do_revert(record, dom, snap, "libvirt" if why_not else "inplace")
        seconds = time.perf_counter() - start
        record.reverts.append((seconds, method, target, reason))
        if self.listener:
            self.listener("revert", record.domain, target, seconds, method, reason)

    def _why_not_inplace(self, record: RunRecord, dom: libvirt.virDomain,
                         snap: libvirt.virDomainSnapshot) -> str | None:
        name = snap.getName()
        if self.settings.revert_method == "libvirt":
            return "chosen by kvm_revert_method"
        why = backend.inplace_possible(dom.connect(), name)
        if why is None and backend.snapshot_state(snap) != "running":
            why = f"snapshot {name!r} was taken while the guest was not running"
        known, identity = record.inplace_ok.get(name), backend.process_identity(dom)
        if why is None and known is None:
            why = f"this QEMU process has not taken or loaded {name!r}"
        elif why is None and (identity is None or known != list(identity)):
            why = "QEMU was restarted or its devices changed since the snapshot was loaded"
        return why

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
        with contextlib.suppress(KvmSnapError):  # if it cannot, each guest says why below
            self._reconnect_if_lost()
        problems.extend(self._drop_failed_baselines())
        if self.finisher and self.lock_dir.is_dir():
            # Clones first: they run from the copies the originals' records name.
            for record in sorted(GuestLock.records(self.lock_dir), key=lambda r: not r.clone_of):
                if record.run_id == self.run_id:
                    problems.extend(self._finish_guest(record))
        for conn in self._connections.values():
            with contextlib.suppress(Exception):  # the daemon may be gone; nothing to release
                conn.close()
        self._connections.clear()
        return problems

    def _drop_failed_baselines(self) -> list[str]:
        """Delete this run's snapshots that failed baseline steps left, found by run id.

        Unless a later step of this run took the guest (its record is then this
        run's, and the finisher restores the guest and deletes the snapshot).
        """
        problems = []
        for uri, name in sorted(self._failed_baselines):
            lock = GuestLock(self.lock_dir, uri, name)
            try:
                record = lock.acquire(self.settings.lock_timeout, self.progress)
                if record is not None and record.run_id == self.run_id:
                    continue
                with backend.libvirt_errors(uri, f"removing this run's snapshot of {name!r}"):
                    for owner, snap in backend.owned_snapshots(self._domain(name, uri)):
                        if owner.run_id == self.run_id:
                            backend.delete_snapshot(snap)
            except KvmSnapError as exc:
                problems.append(f"{name}: {exc}")
            finally:
                lock.release()
        return problems

    def _finish_guest(self, record: RunRecord) -> list[str]:
        lock = GuestLock(self.lock_dir, record.uri, record.domain)
        try:
            record = lock.acquire(self.settings.lock_timeout, self.progress) or record
            if record.clone_of or record.clone_source:
                self._finish_clone_mode(record)
                lock.remove(lock_file=bool(record.clone_of))  # a clone's name is never locked again
                return []
            dom = self._domain(record.domain, record.uri)
            if record.at != record.baseline:
                self._revert_record(record, dom, record.baseline, "end of session", final=True)
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

    def _finish_clone_mode(self, record: RunRecord) -> None:
        """A clone is destroyed, not restored; an original's copies are deleted."""
        if record.clone_of:
            clones.destroy(self.connection(record.uri), record.domain)
        if record.clone_source:
            clones.remove_source(record.clone_source)


class _Outraced(Exception):
    """Another run took a baseline of the guest at the same moment, and is older."""

    def __init__(self, rival: tuple[backend.Owner, str]) -> None:
        super().__init__(rival[1])
        self.rival = rival


def _alive(owner: backend.Owner) -> bool:
    return owner.host != socket.gethostname() or pid_alive(owner.pid)

