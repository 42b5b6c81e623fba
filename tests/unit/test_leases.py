"""The run's lease on a guest's hypervisor (heartbeat.py, leases.py): its rules, on
libvirt's test driver.  The same rules on real daemons (system, and a session daemon
over SSH): tests/integration/test_leases.py."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pytest_kvmsnap.config import Settings, resolve
from pytest_kvmsnap.exceptions import ConfigError, KvmSnapError, LeaseLost
from pytest_kvmsnap.heartbeat import RunLeases
from pytest_kvmsnap.hypervisor import Hypervisor
from pytest_kvmsnap.libvirt import connection, leases
from pytest_kvmsnap.libvirt.leases import LibvirtLeases
from pytest_kvmsnap.libvirt.snapshots import DomainSnapshots
from pytest_kvmsnap.ownership import LeaseRecord, Owner
from tests.conftest import TestDriver
from tests.unit.helpers import run_unit, three_tests

URI = "test:///default"
GUEST = "leased-guest"


def runner(run_id: str, host: str, expiry: float = 60.0) -> RunLeases:
    """A run on ``host`` (another host than this one unless it is this one's name)."""
    owner = Owner(run_id, os.getpid(), host, time.time())
    return RunLeases(Hypervisor(Settings(uri=URI), lambda _event: None), owner, expiry)


@pytest.fixture
def runs(testdriver: TestDriver) -> Iterator[list[RunLeases]]:
    """The runs a test makes; stopped, and their leases removed, afterwards."""
    made: list[RunLeases] = []
    yield made
    for run in made:
        run.stop()
    every = LibvirtLeases(testdriver.conn)
    for handle, _record in every.all():
        every.release(handle)


def test_a_free_guest_is_leased_and_a_live_holder_is_named_to_the_next(runs: list[RunLeases]) -> None:
    first, second = runner("run-a", "host-a"), runner("run-b", "host-b")
    runs += [first, second]
    assert first.take(URI, GUEST) is None
    holder = second.take(URI, GUEST)
    assert holder is not None and holder.holder.run_id == "run-a" and holder.holder.host == "host-a"
    assert holder.describe().startswith("run run-a (pid ") and "on host-a), its lease on the hypervisor until" \
        in holder.describe()


def test_an_expired_lease_is_taken_over_and_its_old_holder_is_fenced_off(runs: list[RunLeases]) -> None:
    stalled, taker = runner("run-a", "host-a", expiry=0.4), runner("run-b", "host-b")
    runs += [stalled, taker]
    assert stalled.take(URI, GUEST) is None
    stalled.stop()  # a runner that stopped renewing (kill -9, powered off, SIGSTOP)
    time.sleep(0.5)
    assert taker.take(URI, GUEST) is None
    found = LibvirtLeases(taker.hypervisor.engine(URI).native).read(GUEST)
    assert found is not None and found[1].holder.run_id == "run-b"
    # Woken up, it knows by its own clock that it may have lost the guest: it touches it no more.
    with pytest.raises(LeaseLost, match="lease on guest 'leased-guest' at test:///default is lost: it was not "
                                        "renewed in time"):
        stalled.check(URI, GUEST)


@pytest.mark.parametrize(("new_holder", "why"), [
    # A host whose clock ran ahead took the lease while it was still being renewed.
    ("run-b", "another run took it over: run run-b"),
    # The run took the guest anew (another of its processes, after this one's lease ran out).
    ("run-a", "another process of this run replaced it with a new lease"),
])
def test_a_holder_whose_lease_was_replaced_learns_it_at_its_next_renewal(runs: list[RunLeases], new_holder: str,
                                                                        why: str) -> None:
    """The renewal, made by the lease's UUID, fails, the holder stops at once, and says who replaced it."""
    holder = runner("run-a", "host-a", expiry=0.8)
    runs.append(holder)
    assert holder.take(URI, GUEST) is None
    conn = holder.hypervisor.engine(URI).native
    found = LibvirtLeases(conn).read(GUEST)
    assert found is not None
    owner = holder.owner if new_holder == "run-a" else Owner(new_holder, 1, "host-b", 1.0)
    LibvirtLeases(conn).take_over(found[0], LeaseRecord(GUEST, owner, time.time() + 60))
    time.sleep(0.5)  # more than one renewal
    with pytest.raises(LeaseLost, match=why):
        holder.check(URI, GUEST)


def test_of_two_hosts_taking_over_one_expired_lease_at_once_exactly_one_wins(runs: list[RunLeases]) -> None:
    dead = runner("run-dead", "host-dead")
    runs.append(dead)
    for attempt in range(20):  # many rounds: the two takers' calls interleave differently each time
        guest = f"{GUEST}-{attempt}"
        assert dead.take(URI, guest) is None
        expire(URI, guest)
        takers = [runner(f"run-{n}", f"host-{n}") for n in "bc"]
        runs.extend(takers)
        results = race([lambda run=run, guest=guest: run.take(URI, guest) for run in takers])  # type: ignore[misc]
        results_by_run = dict(zip([run.owner.run_id for run in takers], results, strict=True))
        winners = [run_id for run_id, holder in results_by_run.items() if holder is None]
        assert len(winners) == 1, results_by_run
        found = LibvirtLeases(takers[0].hypervisor.engine(URI).native).read(guest)
        assert found is not None and found[1].holder.run_id == winners[0]


def test_a_holder_renews_its_lease_while_it_lives(runs: list[RunLeases]) -> None:
    holder = runner("run-a", "host-a", expiry=0.8)  # below the settings' minimum, to be quick here
    runs.append(holder)
    assert holder.take(URI, GUEST) is None
    first = read_expiry(holder)
    time.sleep(1.5)  # several renewals, and longer than the lease
    holder.check(URI, GUEST)  # still ours
    assert read_expiry(holder) > first + 0.5


def test_a_dead_process_on_this_host_frees_its_lease_at_once(runs: list[RunLeases]) -> None:
    import socket

    gone = Owner("run-gone", 2**22 + 7, socket.gethostname(), 1.0)  # no such pid
    conn = runner("x", "y").hypervisor.engine(URI).native
    LibvirtLeases(conn).define(LeaseRecord(GUEST, gone, time.time() + 3600))
    taker = runner("run-b", socket.gethostname())
    runs.append(taker)
    assert taker.take(URI, GUEST) is None


def test_a_domain_by_the_leases_name_that_is_not_one_is_never_touched(testdriver: TestDriver,
                                                                      runs: list[RunLeases]) -> None:
    testdriver.define(GUEST + leases.SUFFIX, start=False)
    run = runner("run-a", "host-a")
    runs.append(run)
    with pytest.raises(Exception, match=r"exists but is not a pytest-kvmsnap lease.*rename that domain"):
        run.take(URI, GUEST)


def test_the_lease_expiry_is_checked_as_a_setting(pytester: pytest.Pytester) -> None:
    assert resolve(pytester.parseconfig("--kvm-lease-expiry=30"), env={}).lease_expiry == 30
    assert resolve(pytester.parseconfig(), env={}).lease_expiry == 120
    with pytest.raises(ConfigError, match=r"kvm_lease_expiry = 2 is too short.*use 8 s or more"):
        resolve(pytester.parseconfig("--kvm-lease-expiry=2"), env={})
    with pytest.raises(ConfigError, match="not a finite number"):
        resolve(pytester.parseconfig("--kvm-lease-expiry=nan"), env={})


def expire(uri: str, guest: str) -> None:
    """Make the guest's lease expired, as if its holder had stopped renewing long ago."""
    conn = connection.open_connection(uri)
    found = LibvirtLeases(conn).read(guest)
    assert found is not None
    handle, record = found
    LibvirtLeases(conn).renew(handle, LeaseRecord(record.guest, record.holder, time.time() - 1))


def read_expiry(run: RunLeases) -> float:
    found = LibvirtLeases(run.hypervisor.engine(URI).native).read(GUEST)
    assert found is not None
    return found[1].expires


def race(calls: list[Callable[[], object]]) -> list[object]:
    """Run ``calls`` in threads released at the same moment; their results, in order."""
    results: list[object] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_lease_a_failed_baseline_took_is_given_back_at_once(pytester: pytest.Pytester, testdriver: TestDriver,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease is taken before the baseline; the baseline fails and no record is left: the
    guest is given back at once, so other runs and hosts need not wait for this run's end (or
    the lease's expiry). The next test, still in the run, finds no lease on it."""
    name = testdriver.define()

    def refuse(*_args: object) -> None:
        raise KvmSnapError("no snapshot today")

    monkeypatch.setattr(DomainSnapshots, "take_baseline", refuse)
    pytester.makepyfile(three_tests(name) + f"""
        def test_z_the_lease_is_gone_already():
            import libvirt
            from pytest_kvmsnap.libvirt.leases import LibvirtLeases
            assert LibvirtLeases(libvirt.open("test:///default")).read({name!r}) is None
    """)
    result = run_unit(pytester, "-p", "no:randomly")
    result.assert_outcomes(errors=3, passed=1)
    result.stdout.fnmatch_lines(["*no snapshot today*"])
    assert LibvirtLeases(testdriver.conn).read(name) is None
