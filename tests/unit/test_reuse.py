"""Guest setups kept across runs (reuse.py), on the in-memory engine: a ``@guest_setup``
fixture runs once per key; later runs start from its kept layer.  On a real guest:
tests/integration/test_layers.py."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pytest_kvmsnap import guest_setup
from pytest_kvmsnap.exceptions import RevertFailed
from pytest_kvmsnap.ownership import SetupRecord
from pytest_kvmsnap.reuse import BOUND, plain, to_delete
from tests.unit import fake_engine
from tests.unit.fake_engine import FakeHost, FakeKind, FakeMachine, FakeSnapshot

CONFTEST = """
    import pytest
    from pathlib import Path
    from pytest_kvmsnap import guest_setup
    from tests.unit import fake_engine

    def pytest_kvmsnap_engine(config):
        return fake_engine.PROVIDED

    @pytest.fixture(scope="session")
    @guest_setup
    def app(kvm_guest_factory):
        guest = kvm_guest_factory.get()
        guest.domain.disk["app"] = "installed"
        runs = Path(__file__).with_name("ran")
        runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
        return {"port": 8080, "guest": guest.name}
"""

TESTS = """
    import pytest

    @pytest.mark.kvm_snapshot("g", snapshot="base")
    @pytest.mark.parametrize("i", range(3))
    def test_t(i, app, kvm_guest):
        disk = kvm_guest.domain.disk
        assert app == {"port": 8080, "guest": "g"}
        assert disk.get("app") == "installed" and "dirt" not in disk
        disk["dirt"] = i
"""


@pytest.fixture
def guest(pytester: pytest.Pytester) -> FakeMachine:
    host = FakeHost()
    made = host.add("g", state="clean")
    made.saved["base"] = FakeSnapshot("base", "", "running", dict(made.disk), made.process)
    fake_engine.PROVIDED = FakeKind(a=host)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_a=TESTS)
    return made


def kept(guest: FakeMachine) -> dict[str, SetupRecord]:
    return {name: record for name, snap in guest.saved.items()
            if (record := SetupRecord.from_description(snap.text)) is not None}


def runs(pytester: pytest.Pytester) -> str:
    return (pytester.path / "ran").read_text()


def test_a_guest_setup_runs_once_and_later_runs_start_from_its_kept_layer(pytester: pytest.Pytester,
                                                                          guest: FakeMachine) -> None:
    first = pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly")
    first.assert_outcomes(passed=3)
    assert runs(pytester) == "x"
    [(name, record)] = kept(guest).items()
    assert name.startswith("kvmsnap-setup-app-") and json.loads(record.value) == {"port": 8080, "guest": "g"}
    first.stdout.fnmatch_lines([f"*g: kept {name} after session fixture 'app' for later runs*"])

    guest.log.clear()
    second = pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly")
    second.assert_outcomes(passed=3)
    assert runs(pytester) == "x", "the kept setup's body ran again"
    second.stdout.fnmatch_lines([f"*g: session fixture 'app' reused from {name} (kept by run *); its body did not "
                                 "run*"])
    # The kept layer is loaded in place of the body (a new VM process: cold), then each test's
    # revert goes to it; the run's end leaves the guest as found, the kept layer for the next run.
    steps = [step.split()[0] for step in guest.log if "setup" in step]
    assert steps == ["cold", "hot", "hot"] and not any(step.startswith("keep") for step in guest.log)
    assert set(kept(guest)) == {name} and guest.disk == {"state": "clean"}


def test_a_changed_source_runs_the_setup_again_and_replaces_what_it_kept(pytester: pytest.Pytester,
                                                                         guest: FakeMachine) -> None:
    pytester.runpytest("--kvm-uri=fake://a").assert_outcomes(passed=3)
    [old] = kept(guest)
    conftest = pytester.path / "conftest.py"
    conftest.write_text(conftest.read_text() + "\n# a helper changed\n")
    pytester.runpytest("--kvm-uri=fake://a").assert_outcomes(passed=3)
    assert runs(pytester) == "xx"
    [new] = kept(guest)
    assert new != old, "never reverted to a setup kept under another key"


def test_another_base_is_another_key(pytester: pytest.Pytester, guest: FakeMachine) -> None:
    """A base snapshot made anew under the same name is another base."""
    pytester.runpytest("--kvm-uri=fake://a").assert_outcomes(passed=3)
    guest.saved["base"] = FakeSnapshot("base", "", "running", {"state": "clean"}, guest.process)
    pytester.runpytest("--kvm-uri=fake://a").assert_outcomes(passed=3)
    assert runs(pytester) == "xx" and len(kept(guest)) == 1


def test_without_a_fixed_base_it_runs_as_any_fixture_and_says_why(pytester: pytest.Pytester,
                                                                   guest: FakeMachine) -> None:
    pytester.makepyfile(test_a=TESTS.replace(', snapshot="base"', ""))
    for _ in range(2):
        result = pytester.runpytest("--kvm-uri=fake://a")
        result.assert_outcomes(passed=3)
        result.stdout.fnmatch_lines(["*guest setup 'app' is not kept for later runs: its guests have no fixed base*"])
    assert runs(pytester) == "xx" and not kept(guest)
    assert set(guest.saved) == {"base"}


def test_a_setup_that_returns_no_plain_data_is_not_kept(pytester: pytest.Pytester, guest: FakeMachine) -> None:
    conftest = pytester.path / "conftest.py"
    conftest.write_text(conftest.read_text().replace('return {"port": 8080, "guest": guest.name}',
                                                     'return guest'))
    pytester.makepyfile(test_a=TESTS.replace('assert app == {"port": 8080, "guest": "g"}', "assert app.name == 'g'"))
    result = pytester.runpytest("--kvm-uri=fake://a")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*guest setup 'app' is not kept for later runs: it returned a Guest, not plain data*"])
    assert not kept(guest)


def test_kept_setups_are_removed_by_cleanup_unless_kept(pytester: pytest.Pytester, guest: FakeMachine) -> None:
    pytester.runpytest("--kvm-uri=fake://a").assert_outcomes(passed=3)
    [name] = kept(guest)
    listed = pytester.runpytest("--kvm-uri=fake://a", "--kvm-cleanup", "--kvm-keep-setups")
    listed.stdout.fnmatch_lines([f"*g: kept guest setup {name} (fixture 'app', kept by run *); left alone*"])
    assert set(kept(guest)) == {name}
    removed = pytester.runpytest("--kvm-uri=fake://a", "--kvm-cleanup")
    removed.stdout.fnmatch_lines([f"*g: deleted kept guest setup {name} (fixture 'app'*"])
    assert not kept(guest) and set(guest.saved) == {"base"}


def test_the_decorator_refuses_what_cannot_be_kept() -> None:
    with pytest.raises(TypeError, match="yields: a kept setup has no teardown"):
        guest_setup(lambda: (yield))
    with pytest.raises(TypeError, match=r"goes below @pytest\.fixture"):
        guest_setup(pytest.fixture(lambda: 1))


def test_plain_values_and_what_a_new_kept_setup_replaces() -> None:
    assert plain({"a": [1, "b"]}) == '{"a": [1, "b"]}'
    assert plain((1, 2)) is None, "a tuple comes back as a list"
    assert plain(object()) is None and plain("x" * 40000) is None

    def record(fixture: str, key: str, created: float, variant: str = "None") -> SetupRecord:
        return SetupRecord(key, fixture, variant, "null", created, f"run-{created:g}")

    new = record("app", "k2", 10)
    kept = [("app-k1", record("app", "k1", 1)), ("app-p", record("app", "k9", 2, variant="'p'")),
            ("db-1", record("db", "d1", 3)), ("web-1", record("web", "w1", 4)), ("app-k2", new)]
    # app under another key: replaced; then the newest BOUND - 1 others stay beside the new one
    assert BOUND == 3 and to_delete(kept, new, "app-k2") == ["app-k1", "app-p"]
    # never one this run kept: another of its workers may be on it
    mine = [(name, dataclasses.replace(record, run_id="run")) for name, record in kept]
    assert to_delete(mine, dataclasses.replace(new, run_id="run"), "app-k2") == []


def test_a_setup_first_used_in_the_middle_of_a_unit_is_not_kept(pytester: pytest.Pytester,
                                                                 guest: FakeMachine) -> None:
    """Going to the base (or to a kept setup) would undo what the unit's earlier tests did."""
    pytester.makepyfile(test_a="""
        import pytest
        pytestmark = pytest.mark.kvm_snapshot("g", snapshot="base", scope="module")

        def test_first(kvm_guest):
            kvm_guest.domain.disk["first"] = "done"

        def test_second(app, kvm_guest):
            assert kvm_guest.domain.disk["first"] == "done" and kvm_guest.domain.disk["app"] == "installed"
    """)
    result = pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*guest setup 'app' is not kept for later runs: it was first set up in the middle*"])
    assert not kept(guest)


def test_a_reuse_that_fails_on_one_guest_leaves_no_layer_on_the_others(pytester: pytest.Pytester,
                                                                       guest: FakeMachine) -> None:
    """The kept setup loads on g but not on h: the test that asked for it errors in one line, and
    a later test on g without the fixture starts from the base, not from g's kept setup."""
    assert fake_engine.PROVIDED is not None
    other = fake_engine.PROVIDED.hosts["a"].add("h", state="clean")
    other.saved["base"] = FakeSnapshot("base", "", "running", dict(other.disk), other.process)
    pytester.makepyfile(test_a="""
        import pytest

        @pytest.mark.kvm_snapshot("g", "h", snapshot="base")
        def test_with_app(app, kvm_guests):
            assert kvm_guests["g"].domain.disk["app"] == "installed"

        @pytest.mark.kvm_snapshot("g", snapshot="base")
        def test_without_app(kvm_guest):   # h is unusable for the rest of the run once its revert failed
            assert "app" not in kvm_guest.domain.disk
    """)
    pytester.runpytest("--kvm-uri=fake://a", "-k", "with_app").assert_outcomes(passed=1, deselected=1)
    assert len(kept(guest)) == 1 and len(kept(other)) == 1

    def refuse(snapshot: object) -> None:
        raise RevertFailed("h's VM process would not start")
    other.fail_hot = True
    other.revert_cold = refuse  # type: ignore[method-assign]
    result = pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*kvmsnap: *h's VM process would not start*"])
    assert runs(pytester) == "x"
