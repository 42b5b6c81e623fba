"""What the plugin has to say while it works: small typed events, one reporter.

The coordinator and the layers under it report these; the pytest glue
(``session.py``) decides how each is shown.  Nothing downstream looks at an
event's text to decide what to do with it: the type says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Waiting:
    """A wait goes on (for a lock, a rival run, libvirtd): shown now and then, not each time."""

    text: str


@dataclass(frozen=True)
class Notice:
    """Something the user should see now (a retry, an adopted snapshot); not kept."""

    text: str


@dataclass(frozen=True)
class Incident:
    """Something that happened to the run (orphans repaired, a holder died, a reconnect):
    shown now and kept for the summary."""

    text: str


@dataclass(frozen=True)
class BaselineTaken:
    domain: str
    snapshot: str
    seconds: float


@dataclass(frozen=True)
class RevertStarting:
    """About to revert: cached connections to the guest are about to go stale."""

    domain: str
    snapshot: str
    reason: str


@dataclass(frozen=True)
class Ready:
    """After the baseline or a revert, the guest is usable again (clock, entropy, wait done)."""

    domain: str
    generation: int  # how many reverts this guest has had in this run
    seconds: float
    steps: tuple[str, ...]  # e.g. ("clock", "reseed", "ssh")


@dataclass(frozen=True)
class Reverted:
    domain: str
    snapshot: str
    seconds: float
    method: str  # inplace, restart or restart-fallback
    reason: str  # which unit edge or request caused it


Event = Waiting | Notice | Incident | BaselineTaken | RevertStarting | Reverted | Ready


class Reporter(Protocol):
    """Where events go: the pytest session's terminal and hooks, or a list in tests."""

    def __call__(self, event: Event, /) -> None: ...


def to_stdout(event: Event) -> None:
    """A reporter for plain use outside pytest's terminal (``--kvm-cleanup``)."""
    if isinstance(event, Waiting | Notice | Incident):
        print(event.text)
