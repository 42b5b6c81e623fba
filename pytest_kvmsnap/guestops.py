"""What the plugin does to a guest this process holds: revert it, settle it after
a revert, find where the host reaches its ports, and hand it to tests as a
:class:`Guest`; with the current test's figures of each.  No pytest here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pytest_kvmsnap.addressing import guest_address
from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.events import Ready, Reporter
from pytest_kvmsnap.exceptions import ConfigError, RevertFailed
from pytest_kvmsnap.figures import GuestFigures
from pytest_kvmsnap.guest import Guest, GuestState
from pytest_kvmsnap.holding import Holder
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.readiness import Readiness
from pytest_kvmsnap.resident import held_at
from pytest_kvmsnap.revert import Reverter

ReadyHook = Callable[[Guest, float], None]


class GuestOps:
    def __init__(self, settings: Settings, hypervisor: Hypervisor, holder: Holder, reverter: Reverter,
                 readiness: Readiness, report: Reporter, ready_hook: ReadyHook | None) -> None:
        self.settings = settings
        self.hypervisor = hypervisor
        self.holder = holder
        self.reverter = reverter
        self.readiness = readiness
        self.report = report
        self.ready_hook = ready_hook  # the user's pytest_kvmsnap_ready, for --kvm-wait=hook
        self.figures: dict[str, GuestFigures] = {}  # the current test's, per guest (real name)

    def figures_of(self, state: GuestState) -> GuestFigures:
        return self.figures.setdefault(state.name, GuestFigures(state.name))

    def guest(self, name: str) -> Guest:
        """The held guest ``name`` as tests see it."""
        state = self.holder.states[name]
        native: Any = self.hypervisor.engine(state.uri).native
        return Guest(state, native, self.holder.machine(state).native,
                     lambda reason: self.manual_revert(state, reason),
                     lambda port: self.address(state, port))

    def run_ready_hook(self, name: str, timeout: float) -> None:
        if self.ready_hook is None:
            raise ConfigError("--kvm-wait=hook, but no pytest_kvmsnap_ready hook is implemented "
                              "(in a conftest.py or a plugin)")
        self.ready_hook(self.guest(name), timeout)

    def address(self, state: GuestState, port: int) -> tuple[str, int]:
        named = self.settings.named_address(state.test_name)
        if named is not None:
            return named.reach(state.test_name, port)
        return guest_address(self.hypervisor.engine(state.uri), self.holder.machine(state), state,
                             state.test_name, port)

    def settle(self, state: GuestState) -> None:
        """After the baseline or a revert: clock, entropy and the wait (readiness.py).

        Until it succeeds the record keeps it pending, so a guest that did not
        come ready is waited for again before the next test.
        """
        record = state.record
        assert record is not None, "a held guest is settled"
        name = state.test_name
        start = time.perf_counter()
        steps = self.readiness.settle(name, self.holder.machine(state), lambda port: self.address(state, port),
                                      restored=record.settle_restored,
                                      resident=held_at(record.resident, state.clean_at, record.baseline,
                                                       state.layers.base))
        seconds = time.perf_counter() - start
        record.settle_pending = record.settle_restored = False
        if steps:
            record.waits.append((seconds, tuple(steps)))
            self.figures_of(state).ready_seconds += seconds
        self.report(Ready(name, record.generation, seconds, tuple(steps)))

    def manual_revert(self, state: GuestState, reason: str) -> None:
        self.revert(state, state.baseline, reason)
        self.settle(state)  # the test goes on using it now
        state.clean_at = None

    def revert(self, state: GuestState, target: str, reason: str) -> None:
        """Revert, retrying once after a lost connection; on failure the record owes a revert."""
        record = state.record
        assert record is not None, "only a held guest is reverted"
        self.holder.check_lease(state)  # a guest another run took over is never reverted
        try:
            self.hypervisor.retrying(
                f"reverting {state.name!r} to {target!r}",
                lambda: self.reverter.revert(record, self.holder.machine(state), target, reason),
                state.uri)
        except BaseException as exc:
            if isinstance(exc, RevertFailed):
                state.broken = str(exc)
            record.revert_owed = True
            state.clean_at = None
            raise
        record.revert_owed = False
        figures = self.figures_of(state)
        figures.revert_seconds += record.reverts[-1][0]
        figures.revert_methods.append(record.reverts[-1][1])
        record.generation += 1
        record.settle_pending = record.settle_restored = True
        state.clean_at = target
