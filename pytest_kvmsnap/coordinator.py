"""The run's guests, test by test: units, the promise, and the end of the run.

A process holds a guest's lock for a whole unit (``units.py``); at the unit's
edges it reverts the guest to the unit's baseline as ``revert`` says, skipping
reverts of a guest known to be clean.  The run's *finisher* (the single pytest
process, or xdist's controller once every worker is done) puts each guest
back as it was found and deletes the run's snapshot.

The work is delegated: ``holding`` (this process's hold on each guest),
``guestops`` (reverting and settling a held guest), ``layering`` (what wider
fixtures built), ``witness`` (evidence of failed tests), ``finishing`` (the
run's end); every collaborator is built here, in :meth:`Coordinator.__init__`.
This module only decides when.
No pytest here: ``session.py`` and ``plugin.py`` are the glue.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from pytest_kvmsnap import postmortem
from pytest_kvmsnap.checkpoints import Checkpoints
from pytest_kvmsnap.config import Settings, Spec, this_host
from pytest_kvmsnap.engine import EngineKind
from pytest_kvmsnap.events import Incident, Reporter, to_stdout
from pytest_kvmsnap.exceptions import ConfigError, KvmSnapError, RevertFailed
from pytest_kvmsnap.figures import GuestFigures
from pytest_kvmsnap.finishing import Finisher
from pytest_kvmsnap.guest import Guest, GuestState
from pytest_kvmsnap.guestops import GuestOps, ReadyHook
from pytest_kvmsnap.heartbeat import RunLeases
from pytest_kvmsnap.holding import Holder
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.layering import Layering
from pytest_kvmsnap.lease import Lease
from pytest_kvmsnap.locking import RecordStore
from pytest_kvmsnap.ownership import Owner
from pytest_kvmsnap.processes import process_token
from pytest_kvmsnap.provisioning import Provisioner
from pytest_kvmsnap.readiness import GuestShell, Readiness
from pytest_kvmsnap.records import RunRecord
from pytest_kvmsnap.recovery import Recovery
from pytest_kvmsnap.revert import Reverter
from pytest_kvmsnap.units import reverts_at_end, reverts_at_start
from pytest_kvmsnap.witness import Witness


class Coordinator:
    def __init__(self, settings: Settings, run_id: str, lock_dir: Path, *, owner_pid: int | None = None,
                 finisher: bool = True, report: Reporter = to_stdout, clone_slot: int | None = None,
                 ready_hook: ReadyHook | None = None, worker: str = "",
                 engine_kind: EngineKind | None = None, ssh_guests: frozenset[str] = frozenset()) -> None:
        self.settings = settings
        self.run_id = run_id
        self.finisher = finisher
        self.report = report
        self.clone_slot = clone_slot  # clone mode: which of the run's clones this process uses
        worker = worker or "main"  # xdist's gwN, for the summary's "served by"
        self.store = RecordStore(lock_dir, report)
        pid = owner_pid or os.getpid()
        owner = Owner(run_id, pid, this_host(), time.time(), process_token(pid))
        self.hypervisor = Hypervisor(settings, report, on_reconnect=self.report_incident, kind=engine_kind)
        self.leases = RunLeases(self.hypervisor, owner, settings.lease_expiry)
        lease = Lease(self.hypervisor, owner, settings.lock_timeout, self.leases, report)
        self.recovery = Recovery(self.hypervisor, lease, self.leases, self.store, settings.uri, report)
        self.provisioner = Provisioner(self.hypervisor, lease, self.leases, self.recovery, self.store,
                                       self._incident, report, residents=ssh_guests)
        self.holder = Holder(settings, self.hypervisor, self.store, lease, self.leases, self.provisioner,
                             self._incident, clone_slot=clone_slot, worker=worker)
        reverter = Reverter(settings, report)
        # guest (as tests name it) -> the kvm_ssh client tests use on it: settles it after reverts
        self.shells: dict[str, GuestShell] = {}
        readiness = Readiness(settings, report, lambda name, timeout: self.ops.run_ready_hook(name, timeout),
                              self.hypervisor.kind.agent_unavailable, self.shells.get)
        self.ops = GuestOps(settings, self.hypervisor, self.holder, reverter, readiness, report, ready_hook)
        self.finishing = Finisher(settings, self.hypervisor, reverter, self.store, report)
        self.witness = Witness(settings, self.hypervisor, run_id, report)
        self.layering = Layering(self.hypervisor, self.holder, self.ops,
                                 Checkpoints(self.hypervisor, owner, worker, report), self._incident)
        self.run_events: list[str] = []  # incidents about no guest in particular, for the summary

    def _incident(self, text: str, record: RunRecord | None = None) -> None:
        """Shown at once and kept for the summary: in the guest's run record when there is
        one (xdist's controller prints those, so workers' incidents reach it too)."""
        (record.events if record is not None else self.run_events).append(text)
        self.report(Incident(text))

    def report_incident(self, text: str) -> None:
        """An incident of the guests held now (a reconnection, a guest setup not kept)."""
        self._incident(text, self.holder.held_record())

    def connection(self) -> Any:
        """The engine's own connection object (libvirt: ``virConnect``): the kvm_connection fixture."""
        return self.hypervisor.engine().native

    def guest(self, name: str) -> Guest:
        return self.ops.guest(name)

    @property
    def figures(self) -> dict[str, GuestFigures]:
        """The current test's, per guest (real name)."""
        return self.ops.figures

    # --- test by test --------------------------------------------------------

    def start_test(self, spec: Spec, unit: str, nodeid: str) -> None:
        """Before a test's fixtures: begin its unit on each guest, revert if due.

        Returns only with every guest protected (see :meth:`_check_protected`);
        anything else raises, and the test errors instead of running.
        """
        self.hypervisor.reconnect_if_lost()
        self.ops.figures = {}
        self.layering.new_test()
        for name in sorted(spec.domains):  # one order everywhere: no lock-order deadlock
            with self.hypervisor.errors(self.settings.uri, f"preparing guest {name!r} for {nodeid}"):
                state = self.holder.prepared(name)
            with self.hypervisor.errors(state.uri, f"preparing guest {name!r} for {nodeid}"):
                self.ops.figures_of(state)
                state.console = None  # set again once the guest is protected for this test
                self._start_guest(state, spec, unit, nodeid)
            self._check_protected(state, unit)
            state.test_failed = False
            self.witness.mark(state, name)

    def _start_guest(self, state: GuestState, spec: Spec, unit: str, nodeid: str) -> None:
        if spec.snapshot and self.clone_slot is not None:
            raise ConfigError(f"snapshot={spec.snapshot!r} cannot be used with --kvm-clones: "
                              "clones start from the state the guest is found in")
        if spec.snapshot and not state.lock.held:
            # Checked first, so the error lists only the user's snapshots.
            self.holder.machine(state).snapshot(spec.snapshot)
        if state.broken:
            raise RevertFailed(f"guest {state.test_name!r} is unusable for the rest of this run: {state.broken}")
        self.holder.check_lease(state)
        if not state.lock.held:
            self.ops.figures_of(state).lock_seconds += self.holder.hold(state, nodeid)
        if state.unit != unit:
            self._begin_unit(state, spec, unit)
        if state.record is not None and state.record.settle_pending:
            self.ops.settle(state)
        if state.record is not None:
            state.record.holder = nodeid  # what waiting runs and deadlock reports name
        state.unit_tests += 1
        state.started_at = state.clean_at
        state.clean_at = None  # dirty from the moment a test that uses it starts (written with the holder)

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
        died = self.holder.machine(state).crash_reason()
        if died:  # after the last unit's end: it is not clean, whatever the record says
            self._incident(f"kvmsnap: {state.name}: went down between tests ({died}); restoring it "
                           f"before {unit}", state.record)
            state.clean_at = None
            state.record.revert_owed = True
        baseline = self.layering.unit_base(state, spec.snapshot or state.record.baseline)
        if reverts_at_start(spec.revert, state.clean_at, baseline, owed=state.record.revert_owed):
            self.ops.revert(state, baseline, f"before {unit}")
        state.record.revert_owed = False
        # Only now: a unit whose first revert failed has not begun, and its next
        # test must not find it begun (it would run on the unreverted guest).
        state.unit, state.unit_baseline, state.unit_revert = unit, baseline, spec.revert
        state.unit_failed, state.unit_tests = False, 0
        self.layering.drop_ended(state)  # ended while another guest was held

    def record_failure(self, domains: tuple[str, ...]) -> None:
        for name in domains:
            if name in self.holder.states:
                self.holder.states[name].unit_failed = self.holder.states[name].test_failed = True

    def failure_evidence(self, domains: tuple[str, ...], nodeid: str,
                         artifacts: Path | None) -> list[tuple[postmortem.ConsoleTail, list[Path]]]:
        """What a failed test's guests showed (witness.py); guests it never got are skipped."""
        states = [self.holder.states[name] for name in domains if name in self.holder.states]
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
            state = self.holder.states.get(name)
            if state is not None and state.lock.held:
                if state.test_failed and self.settings.keep_failed:
                    self.witness.keep(state, name, nodeid, self.ops.figures_of(state))
                errors.extend(self._end_guest(state, name, next_units.get(name)))
        if errors:
            raise RevertFailed("; ".join(dict.fromkeys(errors)))

    def _end_guest(self, state: GuestState, name: str, next_unit: str | None) -> list[str]:
        """End the guest's unit if it ends here (or the guest went down); the errors."""
        errors = []
        try:
            with self.hypervisor.errors(state.uri, f"checking guest {name!r} after the test"):
                died = self.holder.machine(state).crash_reason()
                if died:  # the test errors; the guest is restored now, whatever the unit or mode
                    errors.append(f"guest {name!r} went down during the test: {died}; "
                                  "it is being restored to its baseline for the next test")
                ended = self.layering.leave_ended(state)
                if died or next_unit != state.unit:
                    self._end_unit(state, force=bool(died))
                self.layering.drop(state, ended)
        except KvmSnapError as exc:
            # Whatever failed, the guest may be dirty: the unit is over, and the
            # record says a revert is owed, so the next unit reverts first.
            state.unit = None
            if state.record is not None:
                state.record.revert_owed = True
            errors.append(str(exc))
        finally:
            if state.unit is None:
                self.holder.release(state)
        return errors

    def _end_unit(self, state: GuestState, force: bool = False) -> None:
        unit, baseline = state.unit, state.baseline
        state.unit = None
        if state.broken or not reverts_at_end(state.unit_revert, failed=state.unit_failed, forced=force):
            return
        if state.clean_at != baseline:
            self.ops.revert(state, baseline, f"after {unit}")

    # --- end of run ----------------------------------------------------------

    def finish(self) -> list[str]:
        """Release this process's locks and what its failed steps left; as the finisher,
        restore the run's guests and drop its snapshots (``finishing.py``)."""
        self.holder.release_all()
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
