"""The :class:`Guest` tests receive, and the state the plugin keeps per guest."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import libvirt


@dataclass(frozen=True)
class RevertEvent:
    seconds: float
    method: str
    target: str
    reason: str


@dataclass
class GuestState:
    """What the plugin knows about one guest during a run (not public)."""

    name: str
    uri: str
    run_baseline: str
    baseline_seconds: float = 0.0
    # The snapshot the guest is known to be exactly at, or None once a test used it.
    at: str | None = None
    unit: str | None = None
    unit_baseline: str | None = None
    unit_revert: str = "after"
    unit_failed: bool = False
    broken: str | None = None
    # Snapshot name -> QEMU process identity that may ``loadvm`` it in place.
    inplace_ok: dict[str, tuple[int, str]] = field(default_factory=dict)
    method_notes: dict[str, str] = field(default_factory=dict)
    reverts: list[RevertEvent] = field(default_factory=list)

    @property
    def revert_seconds(self) -> list[float]:
        return [e.seconds for e in self.reverts]

    def summary(self) -> str:
        times = self.revert_seconds
        median = statistics.median(times) if times else 0.0
        line = (f"{self.name}: baseline {self.run_baseline} taken in {self.baseline_seconds:.2f} s, "
                f"{len(times)} revert(s), total {sum(times):.2f} s, median {median:.3f} s")
        if self.broken:
            line += f"; UNUSABLE: {self.broken}"
        return line


class Guest:
    """A libvirt guest as a test sees it.

    ``baseline`` is the snapshot this test's unit reverts to; ``revert()`` goes
    back to it now.  Inside a running test the guest always counts as dirty.
    """

    def __init__(self, state: GuestState, connection: libvirt.virConnect,
                 domain: libvirt.virDomain, revert: Callable[[GuestState, str], None]) -> None:
        self._state = state
        self._revert = revert
        self.connection = connection
        self.domain = domain

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def uri(self) -> str:
        return self._state.uri

    @property
    def baseline(self) -> str:
        return self._state.unit_baseline or self._state.run_baseline

    @property
    def is_dirty(self) -> bool:
        return self._state.at != self.baseline

    def revert(self) -> None:
        """Go back to the baseline now (the test goes on, so the guest stays in use)."""
        self._revert(self._state, "requested by the test")

    def __repr__(self) -> str:
        return f"<Guest {self.name!r} at {self.uri} baseline={self.baseline!r}>"
