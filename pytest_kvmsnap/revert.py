"""Putting a guest back to a snapshot: in place (QEMU's ``loadvm``), or a cold revert.

An in-place ``loadvm`` is safe only into the very QEMU process (same devices)
that took or last loaded the snapshot; the run record remembers which process
that was (``inplace_ok``).  Anything else goes through the engine's own revert,
a *restart* (on libvirt, revertToSnapshot), which starts a new QEMU from the
snapshot -- which then may load it in place.  Decisions only: the engine (engine.py) does the work.
"""

from __future__ import annotations

import time
from typing import Protocol

from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.engine import Machine, Snapshot
from pytest_kvmsnap.events import Reporter, Reverted, RevertStarting
from pytest_kvmsnap.exceptions import RevertFailed
from pytest_kvmsnap.records import RunRecord


class GuestFacts(Protocol):
    """What the choice of method asks about a guest: the engine's answers, or a fake's in tests."""

    def monitor_problem(self, snapshot: str) -> str | None:
        """Why QEMU's monitor cannot be asked to load ``snapshot``, or None."""

    def snapshot_state(self, snapshot: str) -> str:
        """The guest state ``snapshot`` recorded: running, paused, shutoff ..."""

    def process_identity(self) -> tuple[int, str] | None:
        """Which QEMU process runs the guest now; None when none does."""


def why_not_inplace(method: str, facts: GuestFacts, snapshot: str, loaded_by: list[object] | None) -> str | None:
    """Why ``snapshot`` cannot be loaded in place now (None: it can).

    ``method`` is the ``kvm_revert_method`` setting; ``loaded_by`` the identity
    of the QEMU process that took or last loaded ``snapshot``, if any did.
    """
    if method == "restart":
        return "chosen by kvm_revert_method"
    problem = facts.monitor_problem(snapshot)
    if problem is not None:
        return problem
    if facts.snapshot_state(snapshot) != "running":
        return f"snapshot {snapshot!r} was taken while the guest was not running"
    if loaded_by is None:
        return f"this QEMU process has not taken or loaded {snapshot!r}"
    identity = facts.process_identity()
    if identity is None or loaded_by != list(identity):
        return "QEMU was restarted or its devices changed since the snapshot was loaded"
    return None


class MachineFacts:
    """:class:`GuestFacts` from the engine, for one guest and one of its snapshots."""

    def __init__(self, machine: Machine, snap: Snapshot) -> None:
        self.machine, self.snap = machine, snap

    def monitor_problem(self, snapshot: str) -> str | None:
        return self.machine.hot_revert_problem(snapshot)

    def snapshot_state(self, snapshot: str) -> str:
        return self.snap.state()

    def process_identity(self) -> tuple[int, str] | None:
        return self.machine.process_identity()


def remember_loaded(record: RunRecord, machine: Machine, snap: Snapshot) -> None:
    """The VM process running the guest now holds ``snap``'s state: while it lives, it may
    load ``snap`` in place."""
    identity = machine.process_identity()
    if identity is not None and snap.state() == "running":
        record.inplace_ok[snap.name] = list(identity)


QEMU_GONE_WAIT = 15.0  # seconds the engine may take, on a loaded host, to notice that the VM process exited


class Reverter:
    def __init__(self, settings: Settings, report: Reporter) -> None:
        self.settings = settings
        self.report = report

    def revert(self, record: RunRecord, machine: Machine, target: str, reason: str,
               *, final: bool = False) -> None:
        """Put the guest back to ``target``, timed into ``record``; ``final`` at the session's end."""
        snap = machine.snapshot(target)
        why_not = why_not_inplace(self.settings.revert_method, MachineFacts(machine, snap), target,
                                  record.inplace_ok.get(target))
        if why_not and self.settings.revert_method == "inplace" and not final and machine.is_running():
            # Strict mode: the user asked never to pay for a QEMU restart between
            # tests.  A guest whose QEMU is gone needs one anyway, and the
            # end-of-session restore (final) may too: a guest left dirty is worse.
            raise RevertFailed(f"kvm_revert_method=inplace: cannot revert {record.domain!r} to "
                               f"{target!r} in place: {why_not}. Use --kvm-revert-method=auto "
                               "to fall back to a restart from the snapshot there.")
        if why_not:
            record.revert_methods.setdefault(target, f"restart ({why_not})")
        self.report(RevertStarting(record.domain, target, reason))
        start = time.perf_counter()
        method = self._revert(record, machine, snap, "restart" if why_not else "inplace")
        seconds = time.perf_counter() - start
        record.reverts.append((seconds, method, target, reason))
        self.report(Reverted(record.domain, target, seconds, method, reason))

    def _revert(self, record: RunRecord, machine: Machine, snap: Snapshot, method: str) -> str:
        name = snap.name
        if method == "inplace":
            try:
                machine.revert_hot(name)
                record.revert_methods.setdefault(name, "inplace (QEMU loadvm)")
                return "inplace"
            except RevertFailed as exc:
                record.revert_methods[name] = f"restart (in-place load failed: {exc})"
                method = "restart-fallback"
        try:
            machine.revert_cold(snap)
        except RevertFailed:
            # QEMU died under the revert (killed, crashed) and the engine has not yet seen it
            # go ("domain is no longer running"): once it has, the guest is shut off, and
            # its restart starts a new QEMU from the snapshot.
            if not machine.wait_until_down(QEMU_GONE_WAIT):
                raise
            machine.revert_cold(snap)
        remember_loaded(record, machine, snap)  # the new QEMU process was started from it
        return method
