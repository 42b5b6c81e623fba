"""The resident settle process (resident.py), on the in-memory engine: started before the
baseline of a guest whose tests ask for ``kvm_ssh``, and stopped at the run's end.  On a
real guest: tests/integration/test_debian.py (the settle through it, sshd refusing it)."""

from __future__ import annotations

import pytest

from pytest_kvmsnap.config import Settings
from pytest_kvmsnap.guestside import RESIDENT_PERL, RESIDENT_QUIT_PERL
from pytest_kvmsnap.markers import Spec
from pytest_kvmsnap.resident import Resident, held_at
from pytest_kvmsnap.session import ssh_guests
from tests.unit import fake_engine
from tests.unit.fake_engine import FakeHost, FakeKind, FakeMachine

CONFTEST = """
    from tests.unit import fake_engine

    def pytest_kvmsnap_engine(config):
        return fake_engine.PROVIDED
"""

TESTS = """
    import pytest

    @pytest.fixture
    def shell(kvm_ssh):  # asked for through a fixture: still seen at collection
        return kvm_ssh

    # One test: after a revert the plugin would settle over kvm_ssh, and this engine's guests
    # have no sshd (their address is not even loopback).
    @pytest.mark.kvm_snapshot("web")
    def test_over_ssh(shell, kvm_guest):
        assert kvm_guest.domain.disk["resident"], "not started before the baseline"
        kvm_guest.domain.disk["dirt"] = "x"

    @pytest.mark.kvm_snapshot("db")
    @pytest.mark.parametrize("i", range(2))
    def test_plain(i, kvm_guest):
        assert "resident" not in kvm_guest.domain.disk
"""


@pytest.fixture
def guests(pytester: pytest.Pytester) -> dict[str, FakeMachine]:
    host = FakeHost()
    made = {name: host.add(name, state="clean") for name in ("web", "db")}
    for machine in made.values():
        machine.perl = True
    fake_engine.PROVIDED = FakeKind(a=host)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_a=TESTS)
    return made


def test_a_guest_reached_with_kvm_ssh_gets_one_before_its_baseline_and_is_left_without(
        pytester: pytest.Pytester, guests: dict[str, FakeMachine]) -> None:
    pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly").assert_outcomes(passed=3)
    web = guests["web"]
    started, taken = web.log.index(f"run {RESIDENT_PERL[:20]}"), next(
        i for i, step in enumerate(web.log) if step.startswith("take "))
    assert started < taken, "started after the baseline: a revert would lose it"
    final = max(i for i, step in enumerate(web.log) if step.split()[0] in ("hot", "cold"))
    assert f"run {RESIDENT_QUIT_PERL[:20]}" in web.log[final:], "not asked to quit after the final revert"
    assert sum(step.startswith("run ") for step in web.log) == 2, "started more than once"
    assert web.disk == {"state": "clean"}, "the guest is not as found: the resident process is left"
    assert not any(step.startswith("run ") for step in guests["db"].log), "started where no test uses kvm_ssh"


def test_a_guest_without_perl_or_agent_runs_as_before(pytester: pytest.Pytester,
                                                      guests: dict[str, FakeMachine]) -> None:
    guests["web"].perl = False
    pytester.makepyfile(test_a=TESTS.replace('assert kvm_guest.domain.disk["resident"]', "assert True"))
    pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly").assert_outcomes(passed=3)
    assert guests["web"].disk == {"state": "clean"}


def test_which_guests_get_one() -> None:
    specs = [(Spec(("web", "db"), "auto", "function", None), ["kvm_ssh", "kvm_guest"]),
             (Spec(("cache",), "auto", "function", None), ["kvm_guest"]),
             (Spec(("app",), "auto", "function", "clean-install"), ["kvm_ssh"])]
    assert ssh_guests(specs, Settings(uri="test:///default")) == {"web"}, "kvm_ssh is on the test's first guest, " \
        "and a user's snapshot never holds one"
    assert ssh_guests(specs, Settings(uri="test:///default", sync_clock="off", reseed="off")) == frozenset()
    assert ssh_guests(specs, Settings(uri="test:///default", resident="off")) == frozenset()
    assert ssh_guests(specs, Settings(uri="test:///default", clones="auto")) == frozenset(), "a clone starts " \
        "from the original's state, which has none"


def test_only_the_runs_baseline_and_its_layers_hold_it() -> None:
    record = [40000, 77, "t0ken"]
    assert held_at(record, "kvmsnap-abc", "kvmsnap-abc", "") == Resident(40000, 77, "t0ken")
    assert held_at(record, "kvmsnap-abc-gw0-L2", "kvmsnap-abc", "kvmsnap-abc") is not None
    # A layer is named after the run's baseline even when built on a snapshot of the user's.
    assert held_at(record, "kvmsnap-abc-gw0-L1", "kvmsnap-abc", "clean-install") is None
    for snapshot in ("clean-install", "kvmsnap-setup-app-0123", "kvmsnap-abcd", None):
        assert held_at(record, snapshot, "kvmsnap-abc", "kvmsnap-abc") is None, snapshot
    assert held_at([], "kvmsnap-abc", "kvmsnap-abc", "") is None
