"""What each test cost on each guest, as JUnit properties and for the slowest list.

The coordinator fills a :class:`GuestFigures` per guest while a test runs; the
glue puts it into the test's ``user_properties`` (which reach JUnit XML, and
xdist's controller with the reports) and reads it back there for the summary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

PREFIX = "kvmsnap_"


@dataclass
class GuestFigures:
    guest: str
    revert_seconds: float = 0.0  # reverts at this test's unit edges and on its request
    revert_methods: list[str] = field(default_factory=list)
    lock_seconds: float = 0.0  # waiting for the guest's lock (another worker or run held it)
    ready_seconds: float = 0.0  # clock, entropy and --kvm-wait after a revert
    kept_snapshot: str = ""
    kept_guest: str = ""  # where the kept snapshot is: the guest, or a clone's kept domain
    kept_pool: str = ""  # a kept clone's storage pool, holding its disks
    kept_uri: str = ""  # the hypervisor it is on (a pool of hosts has several)
    not_kept: str = ""  # why a failed state was not kept

    @property
    def wait_seconds(self) -> float:
        return self.lock_seconds + self.ready_seconds

    def properties(self) -> list[tuple[str, str]]:
        """JUnit properties, in a fixed order; one set per guest the test used."""
        methods = ",".join(dict.fromkeys(self.revert_methods)) or "none"
        found = [("guest", self.guest), ("revert_seconds", f"{self.revert_seconds:.3f}"),
                 ("revert_method", methods), ("wait_seconds", f"{self.wait_seconds:.3f}"),
                 ("lock_wait_seconds", f"{self.lock_seconds:.3f}"), ("ready_seconds", f"{self.ready_seconds:.3f}")]
        if self.kept_snapshot:
            found.extend([("kept_snapshot", self.kept_snapshot), ("kept_guest", self.kept_guest),
                          ("kept_uri", self.kept_uri)])
        if self.kept_pool:
            found.append(("kept_pool", self.kept_pool))
        if self.not_kept:
            found.append(("not_kept", self.not_kept))
        return [(PREFIX + name, value) for name, value in found]


def from_properties(properties: Iterable[tuple[str, object]]) -> list[GuestFigures]:
    """The figures a test's ``user_properties`` carry (a new guest starts at each ``kvmsnap_guest``)."""
    found: list[GuestFigures] = []
    for name, value in properties:
        if not name.startswith(PREFIX):
            continue
        key, text = name[len(PREFIX):], str(value)
        if key == "guest":
            found.append(GuestFigures(text))
        elif found:
            _set(found[-1], key, text)
    return found


def _set(figures: GuestFigures, key: str, text: str) -> None:
    if key == "revert_seconds":
        figures.revert_seconds = float(text)
    elif key == "revert_method":
        figures.revert_methods = [] if text == "none" else text.split(",")
    elif key == "lock_wait_seconds":
        figures.lock_seconds = float(text)
    elif key == "ready_seconds":
        figures.ready_seconds = float(text)
    elif key == "kept_snapshot":
        figures.kept_snapshot = text
    elif key == "kept_guest":
        figures.kept_guest = text
    elif key == "kept_pool":
        figures.kept_pool = text
    elif key == "kept_uri":
        figures.kept_uri = text
    elif key == "not_kept":
        figures.not_kept = text


@dataclass(frozen=True, order=True)
class Slow:
    seconds: float
    what: str  # "revert (inplace)", "lock wait", "ready"
    guest: str
    test: str


def slow_entries(test: str, guests: list[GuestFigures]) -> list[Slow]:
    """One test's reverts and waits, as entries of the slowest list (``--durations`` style)."""
    entries = []
    for figures in guests:
        if figures.revert_methods:
            methods = ",".join(dict.fromkeys(figures.revert_methods))
            entries.append(Slow(figures.revert_seconds, f"revert ({methods})", figures.guest, test))
        if figures.lock_seconds >= 0.01:  # an uncontended lock is no wait
            entries.append(Slow(figures.lock_seconds, "lock wait", figures.guest, test))
        if figures.ready_seconds:
            entries.append(Slow(figures.ready_seconds, "ready", figures.guest, test))
    return entries
