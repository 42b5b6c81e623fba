"""When the guests' layers are taken and dropped, from the fixtures of marked tests.

pytest sets a test's fixtures up widest scope first.  Wider fixtures that set
up since the last checkpoint are checkpointed (``checkpoints.py``) just before
the first fixture that is not wider than them; a fixture of the test's own unit
or narrower that began rules out any wider one after it.  A torn-down fixture
ends the layers its setup built (``layers.py``).  No pytest here: ``plugin.py``
tells this module what pytest did.
"""

from __future__ import annotations

from pytest_kvmsnap.checkpoints import Checkpoints
from pytest_kvmsnap.config import Spec
from pytest_kvmsnap.exceptions import ConfigError, RevertFailed
from pytest_kvmsnap.guest import GuestState
from pytest_kvmsnap.guestops import GuestOps
from pytest_kvmsnap.holding import Holder
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.layers import Fixture, Layer, carried_away, is_wider
from pytest_kvmsnap.ownership import SetupRecord
from pytest_kvmsnap.provisioning import Incident


class Layering:
    def __init__(self, hypervisor: Hypervisor, holder: Holder, ops: GuestOps, checkpoints: Checkpoints,
                 incident: Incident) -> None:
        self.hypervisor = hypervisor
        self.holder = holder
        self.ops = ops
        self.checkpoints = checkpoints
        self.incident = incident
        # Wider fixtures that set up on the current test's guests since its last checkpoint,
        # and whether a fixture of its unit's own scope or narrower began.
        self._pending: list[Fixture] = []
        self._narrower_began = False
        self._carried: dict[str, str] = {}  # fixture name -> why its guest state is gone

    def new_test(self) -> None:
        self._pending, self._narrower_began = [], False

    def unit_base(self, state: GuestState, base: str) -> str:
        """Where a unit on ``base`` starts: the top layer this process's wider fixtures built."""
        other = state.layers.conflict(base)
        if other is not None:
            raise ConfigError(f"guest {state.name!r}: this test starts from {base!r}, but the state of "
                              f"{other.describe()} was built on {state.layers.base!r} and those fixtures are "
                              "still set up; give the tests that share wider fixtures one snapshot=")
        return state.layers.top(base)

    def leave_ended(self, state: GuestState) -> list[Layer]:
        """Take the guest's ended layers: its unit's next revert goes to the layer below them."""
        ended = state.layers.take_ended()
        if ended:
            state.unit_baseline = state.layers.top(state.layers.base)
        return ended

    def drop(self, state: GuestState, layers: list[Layer]) -> None:
        """Delete ended layers' snapshots (the guest is held, and no longer on them)."""
        self.checkpoints.delete(state, layers)

    def drop_ended(self, state: GuestState) -> None:
        """At a unit's start: drop the layers that ended while this process held another guest."""
        self.checkpoints.delete(state, state.layers.take_ended())

    def before_setup(self, spec: Spec, scope: str, nodeid: str) -> None:
        """A fixture of ``scope`` (``function`` for the test body) is about to set up in a marked
        test: checkpoint what wider fixtures built first, if anything wider than it did."""
        if not is_wider(scope, spec.scope):
            self._narrower_began = True
        if not any(is_wider(f.scope, scope) for f in self._pending):
            return
        fixtures, self._pending = tuple(self._pending), []
        for name in sorted(spec.domains):
            state = self.holder.states[name]
            with self.hypervisor.errors(state.uri, f"checkpointing guest {name!r} for {nodeid}"):
                self.holder.check_lease(state)
                if state.unit_tests > 1:
                    self.incident(f"kvmsnap: {state.name}: {fixtures[0].scope} fixture {fixtures[0].name!r} was "
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

    # --- guest setups kept across runs (reuse.py) ------------------------------

    def setup_refusal(self, spec: Spec, fixture: Fixture) -> str | None:
        """Why guest setup ``fixture`` cannot be kept or reused here (it then runs as any
        fixture); None when it can."""
        if not is_wider(fixture.scope, spec.scope):
            return f"it is not wider than the test's {spec.scope} unit, so it builds no layer"
        if not spec.snapshot:
            return ("its guests have no fixed base to build on: give the tests snapshot= (or --kvm-snapshot), "
                    "the state a kept setup is built on and keyed by")
        if self._pending or self._narrower_began:
            return "other fixtures changed the guest before it in the same setup"
        for name in sorted(spec.domains):
            state = self.holder.states[name]
            if state.layers.top(spec.snapshot) != spec.snapshot:
                return f"it sets up on top of the state of {state.layers.layers[-1].describe()}"
            if state.unit_tests > 1:  # going to the base or the kept setup would undo the unit's earlier tests
                return f"it was first set up in the middle of {state.unit}, on what its earlier tests changed"
        return None

    def bases(self, spec: Spec) -> dict[str, str]:
        """Each guest's base snapshot, as the engine tells it from one made later under its name."""
        assert spec.snapshot, "a kept setup has a fixed base"
        return {name: self.holder.machine(self.holder.states[name]).snapshot(spec.snapshot).identity()
                for name in sorted(spec.domains)}

    def reuse_setup(self, spec: Spec, fixture: Fixture, key: str, nodeid: str) -> str | None:
        """Start from the setup kept under ``key`` on every guest of the test, if each has it:
        its return value (JSON); None (nothing done) when one lacks it."""
        found = {}
        for name in sorted(spec.domains):
            state = self.holder.states[name]
            with self.hypervisor.errors(state.uri, f"looking for the kept setups of guest {name!r}"):
                kept = self.checkpoints.find_setup(state, key)
            if kept is None:
                return None
            found[name] = kept
        for name, (snapshot, record) in found.items():
            state = self.holder.states[name]
            with self.hypervisor.errors(state.uri, f"reusing {snapshot} on guest {name!r} for {nodeid}"):
                self.ops.revert(state, snapshot, f"to reuse {fixture.scope} fixture {fixture.name!r} for {nodeid}")
                self.ops.settle(state)
                state.clean_at = None  # the test that set it up uses it from here on
                self.checkpoints.use_setup(state, spec.snapshot or "", Layer(snapshot, (fixture,), kept=True))
            self.incident(f"kvmsnap: {state.name}: {fixture.scope} fixture {fixture.name!r} reused from {snapshot} "
                          f"(kept by run {record.run_id}); its body did not run", state.record)
        return next(iter(found.values()))[1].value

    def record_setup(self, spec: Spec, nodeid: str) -> None:
        """Before a guest setup runs to be kept: its guests go to the base its key names (unless
        the test started on it, and no fixture changed it since: setup_refusal)."""
        for name in sorted(spec.domains):
            state = self.holder.states[name]
            if state.started_at == spec.snapshot:
                continue
            with self.hypervisor.errors(state.uri, f"reverting guest {name!r} before a guest setup, for {nodeid}"):
                self.ops.revert(state, spec.snapshot or "", f"before a guest setup is kept, for {nodeid}")
                self.ops.settle(state)
                state.clean_at = None

    def keep_setup(self, spec: Spec, fixture: Fixture, record: SetupRecord) -> None:
        """The guest setup ran: keep its layer on every guest of the test."""
        for name in sorted(spec.domains):
            state = self.holder.states[name]
            with self.hypervisor.errors(state.uri, f"keeping guest {name!r} after fixture {fixture.name!r}"):
                self.holder.check_lease(state)
                self.checkpoints.keep_setup(state, spec.snapshot or "", fixture, record)

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
        for state in self.holder.states.values():
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
