"""The run's guests, test by test: units, the promise, and the end of the run.

A process holds a guest's lock for a whole unit (``units.py``); at the unit's
edges it reverts the guest to the unit's baseline as ``revert`` says, skipping
reverts of a guest known to be clean.  The run's *finisher* (the single pytest
process, or xdist's controller once every worker is done) puts each guest
back as it was found and deletes the run's snapshot.

The work is delegated: ``hypervisor`` (connections), ``lease`` (who may use a
guest), ``provisioning`` (the once-per-guest baseline or clone), ``revert``
(how), ``recovery`` (what dead runs left), ``finishing`` (the run's end).
This module only decides when.
No pytest here: ``session.py`` and ``plugin.py`` are the glue.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pytest_kvmsnap import deadlock, postmortem
from pytest_kvmsnap.addressing import guest_address
from pytest_kvmsnap.checkpoints import Checkpoints
from pytest_kvmsnap.config import Settings, Spec, this_host
from pytest_kvmsnap.engine import EngineKind, Machine, refusal
from pytest_kvmsnap.events import Incident, Ready, Reporter, to_stdout
from pytest_kvmsnap.exceptions import (
    ConfigError,
    ConnectionFailed,
    ConnectionLost,
    Deadlock,
    KvmSnapError,
    LeaseLost,
    RevertFailed,
)
from pytest_kvmsnap.figures import GuestFigures
from pytest_kvmsnap.finishing import Finisher
from pytest_kvmsnap.guest import Guest, GuestState
from pytest_kvmsnap.heartbeat import RunLeases
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.layers import Fixture, carried_away, is_wider
from pytest_kvmsnap.lease import Lease
from pytest_kvmsnap.locking import RecordStore
from pytest_kvmsnap.ownership import Owner
from pytest_kvmsnap.placement import Probe, place, worker_slot
from pytest_kvmsnap.processes import process_token
from pytest_kvmsnap.provisioning import Provisioner
from pytest_kvmsnap.readiness import Readiness
from pytest_kvmsnap.records import RunRecord
from pytest_kvmsnap.recovery import Recovery
from pytest_kvmsnap.revert import Reverter
from pytest_kvmsnap.units import reverts_at_end, reverts_at_start
from pytest_kvmsnap.witness import Witness

T = TypeVar("T")

# Failures that say nothing lasting about a guest: never cached as its verdict.
TRANSIENT = (ConnectionLost, ConnectionFailed)


class Coordinator:
    def __init__(self, settings: Settings, run_id: str, lock_dir: Path, *, owner_pid: int | None = None,
                 finisher: bool = True, report: Reporter = to_stdout, clone_slot: int | None = None,
                 ready_hook: Callable[[Guest, float], None] | None = None, worker: str = "",
                 engine_kind: EngineKind | None = None) -> None:
        self.settings = settings
        self.run_id = run_id
        self.finisher = finisher
        self.report = report
        self.clone_slot = clone_slot  # clone mode: which of the run's clones this process uses
        self.worker = worker or "main"  # xdist's gwN, for the summary's "served by"
        self.store = RecordStore(lock_dir, report)
        pid = owner_pid or os.getpid()
        owner = Owner(run_id, pid, this_host(), time.time(), process_token(pid))
        self.hypervisor = Hypervisor(settings, report, on_reconnect=self._reconnected, kind=engine_kind)
        self.leases = RunLeases(self.hypervisor, owner, settings.lease_expiry)
        self.lease = Lease(self.hypervisor, owner, settings.lock_timeout, self.leases)
        self.recovery = Recovery(self.hypervisor, self.lease, self.store)
        self.provisioner = Provisioner(self.hypervisor, self.lease, self.recovery, self.store, self._incident)
        self.reverter = Reverter(settings, report)
        self.readiness = Readiness(settings, report, self._ready_hook, self.hypervisor.kind.agent_unavailable)
        self.ready_hook = ready_hook  # the user's pytest_kvmsnap_ready, for --kvm-wait=hook
        self.finishing = Finisher(self.hypervisor, self.reverter, self.store)
        self.witness = Witness(self.hypervisor, run_id)
        self.checkpoints = Checkpoints(self.hypervisor, owner, self.worker, report)
        # Wider fixtures that set up on the current test's guests since its last checkpoint,
        # and whether a fixture of its unit's own scope or narrower began (layers.py).
        self._pending: list[Fixture] = []
        self._narrower_began = False
        self._carried: dict[str, str] = {}  # fixture name -> why its guest state is gone
        self.run_events: list[str] = []  # incidents about no guest in particular, for the summary
        self._states: dict[str, GuestState] = {}
        self._failures: dict[str, KvmSnapError] = {}
        self.figures: dict[str, GuestFigures] = {}  # the current test's, per guest (real name)

    def _incident(self, text: str, record: RunRecord | None = None) -> None:
        """Shown at once and kept for the summary: in the guest's run record when there is
        one (xdist's controller prints those, so workers' incidents reach it too)."""
        (record.events if record is not None else self.run_events).append(text)
        self.report(Incident(text))

    def _reconnected(self, text: str) -> None:
        held = [state.record for state in self._states.values() if state.lock.held and state.record]
        self._incident(text, held[0] if held else None)

    def connection(self) -> Any:
        """The engine's own connection object (libvirt: ``virConnect``): the kvm_connection fixture."""
        return self.hypervisor.engine().native

    def guest(self, name: str) -> Guest:
        state = self._states[name]
        return Guest(state, self.hypervisor.engine(state.uri).native, self._machine(state).native,
                     lambda reason: self._manual_revert(state, name, reason),
                     lambda port: self._address(state, name, port))

    def _ready_hook(self, name: str, timeout: float) -> None:
        if self.ready_hook is None:
            raise ConfigError("--kvm-wait=hook, but no pytest_kvmsnap_ready hook is implemented "
                              "(in a conftest.py or a plugin)")
        self.ready_hook(self.guest(name), timeout)

    def _address(self, state: GuestState, name: str, port: int) -> tuple[str, int]:
        return guest_address(self.hypervisor.engine(state.uri), self._machine(state), state, name, port)

    # --- once per guest ------------------------------------------------------

    def _first_use(self, name: str, step: Callable[[], T]) -> T:
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

    def _machine(self, state: GuestState) -> Machine:
        return self.hypervisor.machine(state.name, state.uri)

    def _prepared(self, name: str) -> GuestState:
        """This process's state for guest ``name``, prepared once: its host chosen, the domain
        looked up and preflighted, and in clone mode the run's copies made and this process's
        clone named."""
        if name not in self._states:
            uri = self._first_use(name, lambda: self._host_for(name))
            self._first_use(name, lambda: self._check_engine(uri))
            self._first_use(name, lambda: self.hypervisor.machine(name, uri))
            real, slot = name, self.clone_slot
            if slot is not None:
                real = self._first_use(name, lambda: self.provisioner.clone_source(name, slot, uri))
            self._states[name] = GuestState(real, uri, self.store.lock(uri, real),
                                            clone_of=name if real != name else "")
        return self._states[name]

    def _check_engine(self, uri: str) -> None:
        """Refuse, before any guest is touched, a run the engine at ``uri`` cannot serve."""
        settings = self.settings
        why = refusal(self.hypervisor.engine(uri).capabilities(), clones=self.clone_slot is not None,
                      revert_method=settings.revert_method, agent_required="on" in (settings.sync_clock,
                                                                                    settings.reseed),
                      wait=settings.wait.kind)
        if why:
            raise ConfigError(f"the hypervisor at {uri} cannot serve this run: {why}")

    def _host_for(self, name: str) -> str:
        """The hypervisor this process uses guest ``name`` on (placement.py); the one URI without a pool."""
        pool = self.settings.pool
        if len(pool) == 1:
            return pool[0]
        chosen = place(name, pool, worker_slot(self.worker), lambda uri: self._probe(name, uri))
        for line in chosen.skipped:
            self._incident(line)
        return chosen.uri

    def _probe(self, name: str, uri: str) -> Probe:
        try:
            self.hypervisor.machine(name, uri)
        except ConnectionFailed as exc:
            return Probe(uri, problem=f"it cannot be reached ({exc})")
        except KvmSnapError as exc:
            return Probe(uri, problem=str(exc))
        return Probe(uri, holder=self.lease.other_holder(uri, name, self.store.lock(uri, name).read()))

    def _acquire(self, state: GuestState, holder: str) -> None:
        """Hold the guest for this process; the run's first holder takes the baseline."""
        start, baseline_seconds = time.perf_counter(), 0.0

        def take() -> RunRecord:
            nonlocal baseline_seconds
            taking = time.perf_counter()
            try:
                return self.provisioner.take_baseline(state)
            finally:
                baseline_seconds += time.perf_counter() - taking

        held = [other for other in self._states.values() if other is not state and other.lock.held]
        self._waiting_for(held, state.name)
        try:
            record = self.lease.hold(state.lock, state.name, take, rivals=not state.clone_of,  # a clone: ours alone
                                     check=(lambda: self._check_deadlock(state, held)) if held else None)
        finally:
            self._waiting_for(held, "")
        self._figures(state).lock_seconds += time.perf_counter() - start - baseline_seconds
        if record.holder:
            # Our run's last holder never released: it died mid-unit (an xdist
            # worker crash), and the guest is in whatever state it left.
            record.revert_owed = True
            self._incident(f"kvmsnap: {state.name}: previous holder {record.holder} died; reverting", record)
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

    # --- test by test --------------------------------------------------------

    def start_test(self, spec: Spec, unit: str, nodeid: str) -> None:
        """Before a test's fixtures: begin its unit on each guest, revert if due.

        Returns only with every guest protected (see :meth:`_check_protected`);
        anything else raises, and the test errors instead of running.
        """
        self.hypervisor.reconnect_if_lost()
        self.figures = {}
        self._pending, self._narrower_began = [], False
        for name in sorted(spec.domains):  # one order everywhere: no lock-order deadlock
            with self.hypervisor.errors(self.settings.uri, f"preparing guest {name!r} for {nodeid}"):
                state = self._prepared(name)
            with self.hypervisor.errors(state.uri, f"preparing guest {name!r} for {nodeid}"):
                self._figures(state)
                state.console = None  # set again once the guest is protected for this test
                self._start_guest(state, name, spec, unit, nodeid)
            self._check_protected(state, unit)
            state.test_failed = False
            self.witness.mark(state, name)

    def _figures(self, state: GuestState) -> GuestFigures:
        return self.figures.setdefault(state.name, GuestFigures(state.name))

    def _start_guest(self, state: GuestState, name: str, spec: Spec, unit: str, nodeid: str) -> None:
        if spec.snapshot and self.clone_slot is not None:
            raise ConfigError(f"snapshot={spec.snapshot!r} cannot be used with --kvm-clones: "
                              "clones start from the state the guest is found in")
        if spec.snapshot and not state.lock.held:
            # Checked first, so the error lists only the user's snapshots.
            self._machine(state).snapshot(spec.snapshot)
        if state.broken:
            raise RevertFailed(f"guest {name!r} is unusable for the rest of this run: {state.broken}")
        self._check_lease(state)
        if not state.lock.held:
            self._first_use(name, lambda: self._acquire(state, nodeid))
        if state.unit != unit:
            self._begin_unit(state, spec, unit)
        if state.record is not None and state.record.settle_pending:
            self._settle(state, name)
        if state.record is not None:
            state.record.holder = nodeid  # what waiting runs and deadlock reports name
        state.unit_tests += 1
        state.clean_at = None  # dirty from the moment a test that uses it starts (written with the holder)

    def _settle(self, state: GuestState, name: str) -> None:
        """After the baseline or a revert: clock, entropy and the wait (readiness.py).

        Until it succeeds the record keeps it pending, so a guest that did not
        come ready is waited for again before the next test.
        """
        record = state.record
        assert record is not None, "a held guest is settled"
        start = time.perf_counter()
        steps = self.readiness.settle(name, self._machine(state),
                                      lambda port: self._address(state, name, port),
                                      restored=record.settle_restored)
        seconds = time.perf_counter() - start
        record.settle_pending = record.settle_restored = False
        if steps:
            record.waits.append((seconds, tuple(steps)))
            self._figures(state).ready_seconds += seconds
        self.report(Ready(name, record.generation, seconds, tuple(steps)))

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
        died = self._machine(state).crash_reason()
        if died:  # after the last unit's end: it is not clean, whatever the record says
            self._incident(f"kvmsnap: {state.name}: went down between tests ({died}); restoring it "
                           f"before {unit}", state.record)
            state.clean_at = None
            state.record.revert_owed = True
        baseline = self._unit_base(state, spec.snapshot or state.record.baseline)
        if reverts_at_start(spec.revert, state.clean_at, baseline, owed=state.record.revert_owed):
            self._revert(state, baseline, f"before {unit}")
        state.record.revert_owed = False
        # Only now: a unit whose first revert failed has not begun, and its next
        # test must not find it begun (it would run on the unreverted guest).
        state.unit, state.unit_baseline, state.unit_revert = unit, baseline, spec.revert
        state.unit_failed, state.unit_tests = False, 0
        self.checkpoints.delete(state, state.layers.take_ended())  # ended while another guest was held

    def _unit_base(self, state: GuestState, base: str) -> str:
        """Where a unit on ``base`` starts: the top layer this process's wider fixtures built."""
        other = state.layers.conflict(base)
        if other is not None:
            raise ConfigError(f"guest {state.name!r}: this test starts from {base!r}, but the state of "
                              f"{other.describe()} was built on {state.layers.base!r} and those fixtures are "
                              "still set up; give the tests that share wider fixtures one snapshot=")
        return state.layers.top(base)

    def record_failure(self, domains: tuple[str, ...]) -> None:
        for name in domains:
            if name in self._states:
                self._states[name].unit_failed = self._states[name].test_failed = True

    def failure_evidence(self, domains: tuple[str, ...], nodeid: str,
                         artifacts: Path | None) -> list[tuple[postmortem.ConsoleTail, list[Path]]]:
        """What a failed test's guests showed (witness.py); guests it never got are skipped."""
        states = [self._states[name] for name in domains if name in self._states]
        return [self.witness.evidence(state, nodeid, artifacts) for state in states if state.console is not None]

    def end_test(self, spec: Spec, next_units: dict[str, str | None], nodeid: str = "") -> None:
        """After a test's fixtures are torn down: close the unit if it ends here.

        ``next_units`` maps each guest to the unit of the next test that uses it
        in this process (None when the next test does not use it).  Every guest
        whose unit ends is released, whatever fails on the way.  A failed test's
        state is kept first, when asked (``--kvm-keep-failed``).
        """
        errors = []
        try:
            self.hypervisor.reconnect_if_lost()
        except KvmSnapError as exc:
            errors.append(str(exc))
        for name in spec.domains:
            state = self._states.get(name)
            if state is not None and state.lock.held:
                if state.test_failed and self.settings.keep_failed:
                    self.witness.keep(state, name, nodeid, self._figures(state))
                errors.extend(self._end_guest(state, name, next_units.get(name)))
        if errors:
            raise RevertFailed("; ".join(dict.fromkeys(errors)))

    def _end_guest(self, state: GuestState, name: str, next_unit: str | None) -> list[str]:
        """End the guest's unit if it ends here (or the guest went down); the errors."""
        errors = []
        try:
            with self.hypervisor.errors(state.uri, f"checking guest {name!r} after the test"):
                died = self._machine(state).crash_reason()
                if died:  # the test errors; the guest is restored now, whatever the unit or mode
                    errors.append(f"guest {name!r} went down during the test: {died}; "
                                  "it is being restored to its baseline for the next test")
                ended = state.layers.take_ended()
                if ended:  # the next revert goes to the layer below; the unit's mode says when
                    state.unit_baseline = state.layers.top(state.layers.base)
                if not died and next_unit == state.unit:
                    self.checkpoints.delete(state, ended)
                    return []  # the unit goes on: keep holding the guest
                self._end_unit(state, force=bool(died))
                self.checkpoints.delete(state, ended)
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
        if state.clean_at != baseline:
            self._revert(state, baseline, f"after {unit}")

    def _check_lease(self, state: GuestState) -> None:
        """A guest whose lease this run lost is another run's now: unusable for the rest of the run."""
        try:
            self.leases.check(state.uri, state.clone_of or state.name)
        except LeaseLost as exc:
            state.broken = str(exc)
            raise

    def _manual_revert(self, state: GuestState, name: str, reason: str) -> None:
        self._revert(state, state.baseline, reason)
        self._settle(state, name)  # the test goes on using it now
        state.clean_at = None

    def _revert(self, state: GuestState, target: str, reason: str) -> None:
        """Revert, retrying once after a lost connection; on failure the record owes a revert."""
        record = state.record
        assert record is not None, "only a held guest is reverted"
        self._check_lease(state)  # a guest another run took over is never reverted
        try:
            self.hypervisor.retrying(
                f"reverting {state.name!r} to {target!r}",
                lambda: self.reverter.revert(record, self._machine(state), target, reason),
                state.uri)
        except BaseException as exc:
            if isinstance(exc, RevertFailed):
                state.broken = str(exc)
            record.revert_owed = True
            state.clean_at = None
            raise
        record.revert_owed = False
        figures = self._figures(state)
        figures.revert_seconds += record.reverts[-1][0]
        figures.revert_methods.append(record.reverts[-1][1])
        record.generation += 1
        record.settle_pending = record.settle_restored = True
        state.clean_at = target

    # --- layers: what wider fixtures built (layers.py) -----------------------

    def before_setup(self, spec: Spec, scope: str, nodeid: str) -> None:
        """A fixture of ``scope`` (``function`` for the test body) is about to set up in a marked
        test: checkpoint what wider fixtures built first, if anything wider than it did."""
        if not is_wider(scope, spec.scope):
            self._narrower_began = True
        if not any(is_wider(f.scope, scope) for f in self._pending):
            return
        fixtures, self._pending = tuple(self._pending), []
        for name in sorted(spec.domains):
            state = self._states[name]
            with self.hypervisor.errors(state.uri, f"checkpointing guest {name!r} for {nodeid}"):
                self._check_lease(state)
                if state.unit_tests > 1:
                    self._incident(f"kvmsnap: {state.name}: {fixtures[0].scope} fixture {fixtures[0].name!r} was "
                                   f"first set up in the middle of {state.unit} (by {nodeid}): its checkpoint "
                                   "holds what the unit's earlier tests changed", state.record)
                layer = self.checkpoints.take(state, state.layers.base or state.baseline, fixtures)
                state.unit_baseline = layer.snapshot

    def fixture_set_up(self, spec: Spec, fixture: Fixture) -> None:
        """A fixture set up in a marked test; one wider than the test's unit is checkpointed later."""
        if not is_wider(fixture.scope, spec.scope):
            return
        if self._narrower_began:
            raise ConfigError(f"{fixture.scope} fixture {fixture.name!r} set up after fixtures of the test's "
                              f"own unit began (requested with getfixturevalue?), so the guest state it built "
                              "cannot be kept apart from theirs; request it as an argument instead")
        self._pending.append(fixture)

    def fixture_failed(self, fixture: Fixture) -> None:
        """A fixture failed in setup: it checkpoints nothing, and the wider ones that set up before
        it in this setup and were not checkpointed yet stay cached with their state about to be
        reverted away: later tests that use them error, naming them."""
        for gone in self._pending:
            self._carried[gone.name] = (f"the guest state of {gone.scope} fixture {gone.name!r} was not kept: "
                                        f"{fixture.scope} fixture {fixture.name!r} failed in the same setup "
                                        "before it could be checkpointed; fix that fixture")
        self._pending = []

    def fixture_ended(self, key: int) -> None:
        """A fixture was torn down: the layers its setup built end (the guest leaves them at the
        unit's next revert; their snapshots are deleted once the guest is held)."""
        for state in self._states.values():
            ended = state.layers.end(key)
            for gone in carried_away(ended, key):
                self._carried[gone.name] = (f"the guest state of {gone.scope} fixture {gone.name!r} on "
                                            f"{state.name!r} was built on top of a fixture that was torn down "
                                            f"before it, and went with it; request {gone.name!r} in the first "
                                            "test of its scope, or make it autouse, so it sets up first")

    def check_fixtures(self, names: list[str]) -> None:
        """A test that uses a fixture whose guest state is gone errors (see layers.carried_away)."""
        for name in names:
            if name in self._carried:
                raise RevertFailed(self._carried[name])

    # --- end of run ----------------------------------------------------------

    def finish(self) -> list[str]:
        """Release this process's locks and what its failed steps left; as the finisher,
        restore the run's guests and drop its snapshots (``finishing.py``)."""
        for state in self._states.values():
            self._release(state)
        with contextlib.suppress(KvmSnapError):  # if it cannot, each guest says why below
            self.hypervisor.reconnect_if_lost()
        problems = self.provisioner.drop_failed()
        if self.finisher:
            problems.extend(self.finishing.finish_run(self.run_id, self.leases))
        self.leases.stop()
        self.hypervisor.close()
        self.store.close()
        return problems

    def left_behind(self) -> str:
        """What an interrupted :meth:`finish` left, from the run records alone (no hypervisor call:
        this is asked on the way out after a second Ctrl-C)."""
        left = [f"{r.domain} at {r.uri}" if len(self.settings.pool) > 1 else r.domain
                for r in self.store.own_records(self.run_id)]
        return ", ".join(sorted(left)) or "nothing"
