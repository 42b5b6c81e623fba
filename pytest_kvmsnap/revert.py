"""Putting a guest back to a snapshot: in place with QEMU's ``loadvm``, or with libvirt.

An in-place ``loadvm`` is safe only into the very QEMU process (same devices)
that took or last loaded the snapshot; the run record remembers which process
that was (``inplace_ok``).  Anything else goes through libvirt's revert, which
starts a new QEMU from the snapshot -- which then may load it in place.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from pytest_kvmsnap import backend
from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.events import Reporter, Reverted, RevertStarting
from pytest_kvmsnap.exceptions import RevertFailed
from pytest_kvmsnap.locking import RunRecord

if TYPE_CHECKING:
    import libvirt


class GuestFacts(Protocol):
    """What the choice of method asks about a guest: libvirt's answers, or a fake's in tests."""

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
    if method == "libvirt":
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


class LibvirtFacts:
    """:class:`GuestFacts` from libvirt, for one domain and one of its snapshots."""

    def __init__(self, dom: libvirt.virDomain, snap: libvirt.virDomainSnapshot) -> None:
        self.dom, self.snap = dom, snap

    def monitor_problem(self, snapshot: str) -> str | None:
        return backend.inplace_possible(self.dom.connect(), snapshot)

    def snapshot_state(self, snapshot: str) -> str:
        return backend.snapshot_state(self.snap)

    def process_identity(self) -> tuple[int, str] | None:
        return backend.process_identity(self.dom)


def remember_loaded(record: RunRecord, dom: libvirt.virDomain, snap: libvirt.virDomainSnapshot) -> None:
    """The QEMU process running ``dom`` now holds ``snap``'s state: while it lives, it may
    load ``snap`` in place."""
    identity = backend.process_identity(dom)
    if identity is not None and backend.snapshot_state(snap) == "running":
        record.inplace_ok[snap.getName()] = list(identity)


QEMU_GONE_WAIT = 15.0  # seconds libvirt may take, on a loaded host, to notice that QEMU exited


class Reverter:
    def __init__(self, settings: Settings, report: Reporter) -> None:
        self.settings = settings
        self.report = report

    def revert(self, record: RunRecord, dom: libvirt.virDomain, target: str, reason: str,
               *, final: bool = False) -> None:
        """Put ``dom`` back to ``target``, timed into ``record``; ``final`` at the session's end."""
        snap = backend.lookup_snapshot(dom, target)
        why_not = why_not_inplace(self.settings.revert_method, LibvirtFacts(dom, snap), target,
                                  record.inplace_ok.get(target))
        if why_not and self.settings.revert_method == "inplace" and not final and dom.isActive():
            # Strict mode: the user asked never to pay for a QEMU restart between
            # tests.  A guest whose QEMU is gone needs one anyway, and the
            # end-of-session restore (final) may too: a guest left dirty is worse.
            raise RevertFailed(f"kvm_revert_method=inplace: cannot revert {record.domain!r} to "
                               f"{target!r} in place: {why_not}. Use --kvm-revert-method=auto "
                               "to fall back to libvirt's revert there.")
        if why_not:
            record.revert_methods.setdefault(target, f"libvirt ({why_not})")
        self.report(RevertStarting(record.domain, target, reason))
        start = time.perf_counter()
        method = self._revert(record, dom, snap, "libvirt" if why_not else "inplace")
        seconds = time.perf_counter() - start
        record.reverts.append((seconds, method, target, reason))
        self.report(Reverted(record.domain, target, seconds, method, reason))

    def _revert(self, record: RunRecord, dom: libvirt.virDomain,
                snap: libvirt.virDomainSnapshot, method: str) -> str:
        name = snap.getName()
        if method == "inplace":
            try:
                backend.revert_inplace(dom, name)
                record.revert_methods.setdefault(name, "inplace (QEMU loadvm)")
                return "inplace"
            except RevertFailed as exc:
                record.revert_methods[name] = f"libvirt (in-place load failed: {exc})"
                method = "libvirt-fallback"
        try:
            backend.revert_libvirt(dom, snap)
        except RevertFailed:
            # QEMU died under the revert (killed, crashed) and libvirt has not yet seen it
            # go ("domain is no longer running"): once it has, the guest is shut off, and
            # libvirt's revert starts a new QEMU from the snapshot.
            if not backend.wait_until_down(dom, QEMU_GONE_WAIT):
                raise
            backend.revert_libvirt(dom, snap)
        remember_loaded(record, dom, snap)  # the new QEMU process was started from it
        return method
