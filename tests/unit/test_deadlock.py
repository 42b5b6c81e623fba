"""The wait-for graph over run records, without a hypervisor (deadlock.py)."""

from __future__ import annotations

from pytest_kvmsnap.deadlock import Link, describe, find_cycle
from pytest_kvmsnap.records import RunRecord


def held(guest: str, pid: int, test: str, waiting_for: str = "") -> RunRecord:
    return RunRecord("qemu:///system", guest, "run", 1, "h", 0.0, "kvmsnap-run", None, holder=test,
                     holder_pid=pid, waiting_for=waiting_for)


def test_two_workers_each_waiting_for_the_others_guest() -> None:
    records = [held("a", 10, "t1.py::test_2", waiting_for="b"), held("b", 20, "t2.py::test_2", waiting_for="a")]
    chain = find_cycle(10, "b", records)
    assert chain == [Link(20, "t2.py::test_2", "a")]
    text = describe("b", ["a"], chain)
    assert text.startswith("deadlock: this process holds 'a' and waits for 'b'; 'b' is held by pid 20 "
                           "(in t2.py::test_2), which waits for 'a'.")


def test_a_longer_cycle_and_no_cycle() -> None:
    ring = [held("a", 1, "x", "b"), held("b", 2, "y", "c"), held("c", 3, "z", "a")]
    assert [link.pid for link in find_cycle(1, "b", ring) or []] == [2, 3]
    assert find_cycle(1, "b", [held("a", 1, "x", "b"), held("b", 2, "y")]) is None  # 2 is not waiting
    assert find_cycle(1, "b", [held("a", 1, "x", "b")]) is None  # nobody holds b: the wait ends soon
    # A cycle between others that this process merely waits on: its members see it, not us.
    assert find_cycle(9, "b", [held("b", 2, "y", "c"), held("c", 3, "z", "b")]) is None


def test_a_released_guest_is_no_edge() -> None:
    released = held("b", 20, "", waiting_for="a")  # holder '' : nobody holds it now
    assert find_cycle(10, "b", [held("a", 10, "t", "b"), released]) is None
