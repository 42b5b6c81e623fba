"""Which host of the pool a process uses (placement.py): decisions, against fake hosts."""

from __future__ import annotations

import pytest

from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.placement import Probe, in_order, place, worker_slot

POOL = ("qemu+ssh://a/system", "qemu+ssh://b/system", "qemu+ssh://c/system")


def hosts(**offers: Probe) -> dict[str, Probe]:
    return {uri: offers.get(uri.split("/")[2], Probe(uri)) for uri in POOL}


def test_each_worker_starts_at_its_own_host() -> None:
    assert [worker_slot(w) for w in ("gw0", "gw3", "main", "")] == [0, 3, 0, 0]
    assert in_order(POOL, 0) == list(POOL)
    assert in_order(POOL, 1) == [POOL[1], POOL[2], POOL[0]]
    assert in_order(POOL, 4) == in_order(POOL, 1)
    free = hosts()
    assert [place("g", POOL, slot, free.__getitem__).uri for slot in range(4)] == [*POOL, POOL[0]]


def test_hosts_that_cannot_serve_are_skipped_with_one_line_each() -> None:
    offers = hosts(a=Probe(POOL[0], problem="it cannot be reached (refused)"),
                   b=Probe(POOL[1], problem="no domain named 'g'"))
    chosen = place("g", POOL, 0, offers.__getitem__)
    assert chosen.uri == POOL[2] and not chosen.waits
    assert chosen.skipped == (f"kvmsnap: guest 'g': skipping {POOL[0]}: it cannot be reached (refused)",
                              f"kvmsnap: guest 'g': skipping {POOL[1]}: no domain named 'g'")


def test_a_host_whose_guest_another_run_holds_is_passed_over_for_a_free_one() -> None:
    offers = hosts(a=Probe(POOL[0], holder="run x"))
    assert place("g", POOL, 0, offers.__getitem__).uri == POOL[1]


def test_when_every_host_is_busy_the_process_waits_at_the_first_in_its_order() -> None:
    offers = {uri: Probe(uri, holder="run x") for uri in POOL}
    chosen = place("g", POOL, 2, offers.__getitem__)
    assert chosen.uri == POOL[2] and chosen.waits


def test_a_pool_with_no_usable_host_is_one_error_with_every_reason() -> None:
    offers = {uri: Probe(uri, problem="it cannot be reached (down)") for uri in POOL}
    with pytest.raises(KvmSnapError) as error:
        place("g", POOL, 0, offers.__getitem__)
    assert str(error.value) == ("no hypervisor of the pool can serve guest 'g': "
                                + "; ".join(f"{uri}: it cannot be reached (down)" for uri in POOL))


def test_the_pool_is_the_repeated_uri_in_order_without_repeats(pytester: pytest.Pytester) -> None:
    from pytest_kvmsnap.config import resolve

    settings = resolve(pytester.parseconfig("--kvm-uri=qemu:///system", "--kvm-uri=qemu+ssh://b/system",
                                            "--kvm-uri=qemu:///system"), env={})
    assert settings.pool == ("qemu:///system", "qemu+ssh://b/system") and settings.uri == "qemu:///system"
    pytester.makeini("[pytest]\nkvm_uri =\n    qemu+ssh://a/system\n    qemu+ssh://b/system\n")
    assert resolve(pytester.parseconfig(), env={}).pool == ("qemu+ssh://a/system", "qemu+ssh://b/system")
    assert resolve(pytester.parseconfig(), env={"LIBVIRT_DEFAULT_URI": "x"}).uri == "qemu+ssh://a/system"
