"""Which hypervisor of the pool a process uses for a guest (``--kvm-uri`` given more than once).

Each process decides once per guest.  It tries the hosts in an order turned by
its slot (xdist worker N starts at host N mod hosts), so a run's workers spread
over the pool.  It takes the first host that can be reached, has the guest, and
where no other live run holds it; when every usable host's guest is held, it
waits on the first of those in its order.  Each host it skips is one line.
Plain decisions: the caller's ``probe`` asks the hypervisor.  No pytest here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pytest_kvmsnap.exceptions import KvmSnapError


@dataclass(frozen=True)
class Probe:
    """What one host of the pool offers for a guest."""

    uri: str
    problem: str = ""  # it cannot be used: unreachable, no such guest, a guest the plugin cannot snapshot
    holder: str = ""  # another live run holds the guest there (it may be waited for)


@dataclass(frozen=True)
class Placement:
    uri: str
    skipped: tuple[str, ...]  # one line per host that could not be used
    waits: bool = False  # every usable host's guest is held: the process waits at ``uri``


def worker_slot(worker: str) -> int:
    """Which host of the pool a process tries first: xdist worker gwN the Nth, any other the first."""
    digits = worker.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


def in_order(pool: tuple[str, ...], slot: int) -> list[str]:
    """The pool as process ``slot`` tries it: from host ``slot mod len(pool)`` round."""
    start = slot % len(pool)
    return [*pool[start:], *pool[:start]]


def place(guest: str, pool: tuple[str, ...], slot: int, probe: Callable[[str], Probe]) -> Placement:
    skipped: list[str] = []
    busy: list[str] = []
    for uri in in_order(pool, slot):
        found = probe(uri)
        if found.problem:
            skipped.append(f"kvmsnap: guest {guest!r}: skipping {uri}: {found.problem}")
        elif found.holder:
            busy.append(uri)
        else:
            return Placement(uri, tuple(skipped))
    if busy:
        return Placement(busy[0], tuple(skipped), waits=True)
    reasons = "; ".join(line.split(": skipping ", 1)[1] for line in skipped)
    raise KvmSnapError(f"no hypervisor of the pool can serve guest {guest!r}: {reasons}")
