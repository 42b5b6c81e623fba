"""Two processes that each hold a guest and wait for the other's: found, not waited out.

Units of class, module, package or session scope keep their guest between
tests, so a worker in a module unit on guest A whose next test also needs B
can wait for B while another worker's unit holds B and waits for A.  Each
waiting process writes, into the records of the guests it holds, which guest
it waits for; from all records the wait-for graph is read, and a cycle back
to the asking process is a deadlock.  Plain code, no I/O: the coordinator
reads the records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pytest_kvmsnap.records import RunRecord


@dataclass(frozen=True)
class Link:
    pid: int
    test: str  # the test it is in (its record's holder)
    waits_for: str  # the guest it waits for


def find_cycle(me: int, wanted: str, records: Iterable[RunRecord]) -> list[Link] | None:
    """The chain of processes from ``me`` (waiting for ``wanted``) back to ``me``, if there is one."""
    holders: dict[str, tuple[int, str]] = {}  # guest -> (pid, test) holding it now
    waits: dict[int, str] = {}  # pid -> the guest it waits for
    for record in records:
        if record.holder and record.holder_pid:
            holders[record.domain] = (record.holder_pid, record.holder)
            if record.waiting_for:
                waits[record.holder_pid] = record.waiting_for
    chain: list[Link] = []
    seen, guest = {me}, wanted
    while guest in holders:
        pid, test = holders[guest]
        if pid == me:
            return chain
        if pid in seen or pid not in waits:
            return None  # not waiting, or a cycle that does not pass through me: its members see it
        seen.add(pid)
        guest = waits[pid]
        chain.append(Link(pid, test, guest))
    return None


def describe(wanted: str, held: list[str], chain: list[Link]) -> str:
    steps = "; ".join(f"{(wanted if i == 0 else chain[i - 1].waits_for)!r} is held by pid {link.pid} "
                      f"(in {link.test}), which waits for {link.waits_for!r}" for i, link in enumerate(chain))
    return (f"deadlock: this process holds {', '.join(map(repr, held))} and waits for {wanted!r}; {steps}. "
            "Waiting would last until --kvm-lock-timeout, so the test errors now. Units of a scope wider "
            "than one test keep their guests between tests: give such units one guest each, or the same "
            "guests in the same order, or keep them on one worker (--dist loadgroup, -n 0)")
