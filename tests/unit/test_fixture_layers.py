"""Layered baselines through pytest, on the in-memory engine: every test starts from what its
wider fixtures built (layers.py).  The same rules on real guests: tests/integration/test_layers.py."""

from __future__ import annotations

import pytest

from pytest_kvmsnap.layers import Fixture, LayerStack, carried_away, is_wider
from tests.unit import fake_engine
from tests.unit.fake_engine import FakeHost, FakeKind, FakeMachine, FakeSnapshot

CONFTEST = """
    import pytest
    from tests.unit import fake_engine

    def pytest_kvmsnap_engine(config):
        return fake_engine.PROVIDED

    @pytest.fixture(scope="session")
    def app(kvm_guest_factory):
        guest = kvm_guest_factory.get()
        guest.domain.disk["app"] = "installed"   # what a session fixture installs over SSH
        yield guest.name
        guest.domain.disk["app-teardown"] = "ran"

    @pytest.fixture(scope="module")
    def seed(app, kvm_guest_factory):
        kvm_guest_factory.get().domain.disk["seed"] = "seeded"
"""

STORY = """
    import pytest

    @pytest.mark.kvm_snapshot("g")
    @pytest.mark.parametrize("i", range(3))
    def test_t(i, app, seed, kvm_guest):
        disk = kvm_guest.domain.disk
        assert disk.get("app") == "installed", "the session fixture's app is gone"
        assert disk.get("seed") == "seeded", "the module fixture's seed is gone"
        assert "dirt" not in disk, "an earlier test's change leaked"
        disk["dirt"] = i
"""

SECOND_MODULE = """
    import pytest

    @pytest.mark.kvm_snapshot("g")
    def test_other_module(app, kvm_guest):
        disk = kvm_guest.domain.disk
        assert disk.get("app") == "installed"
        assert "seed" not in disk, "the first module's seed leaked"
        assert "dirt" not in disk
"""


@pytest.fixture
def guest(pytester: pytest.Pytester) -> FakeMachine:
    host = FakeHost()
    made = host.add("g", state="clean")
    fake_engine.PROVIDED = FakeKind(a=host)
    pytester.makeconftest(CONFTEST)
    return made


def ops(guest: FakeMachine) -> list[str]:
    """The engine's log with the run id taken out: take/hot/delete and which snapshot."""
    return [" ".join([step.split()[0], step.split()[1].split("-", 2)[-1] if "-L" in step else "base"])
            for step in guest.log]


def test_every_test_starts_from_what_its_wider_fixtures_built(pytester: pytest.Pytester, guest: FakeMachine) -> None:
    pytester.makepyfile(test_a=STORY, test_b=SECOND_MODULE)
    result = pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly", "-v")
    result.assert_outcomes(passed=4)
    # One checkpoint per layer: the session's app, then the module's seed on top; reverts within
    # the module go to the seed; the module's end goes down to the app; the session's end to the
    # baseline, as found.
    assert ops(guest) == ["take base", "take main-L1", "take main-L2",
                          "hot main-L2", "hot main-L2",
                          "hot main-L1", "delete main-L2",
                          "hot base", "delete main-L1",
                          "delete base"]
    assert guest.disk == {"state": "clean"} and guest.saved == {}
    result.stdout.fnmatch_lines(["*g: checkpoint kvmsnap-*-main-L1 after session fixture 'app'*",
                                 "*g: checkpoint kvmsnap-*-main-L2 after module fixture 'seed'*"])


@pytest.mark.parametrize("scope", ["function", "class"])
def test_a_fixture_that_lives_no_longer_than_the_test_is_no_layer(pytester: pytest.Pytester, guest: FakeMachine,
                                                                  scope: str) -> None:
    """A fixture of the test's own scope is set up again for each test: no checkpoint.  So is a
    class-scoped one on a test outside a class (pytest falls back to the function)."""
    pytester.makepyfile(test_a=f"""
        import pytest

        @pytest.fixture(scope="{scope}")
        def per_test(kvm_guest_factory):
            kvm_guest_factory.get().domain.disk["mine"] = "set"

        @pytest.mark.kvm_snapshot("g")
        @pytest.mark.parametrize("i", range(2))
        def test_t(i, per_test, kvm_guest):
            assert kvm_guest.domain.disk["mine"] == "set"
    """)
    pytester.runpytest("--kvm-uri=fake://a").assert_outcomes(passed=2)
    assert ops(guest) == ["take base", "hot base", "hot base", "delete base"]


def test_a_module_unit_layers_only_what_outlives_the_module(pytester: pytest.Pytester, guest: FakeMachine) -> None:
    pytester.makepyfile(test_a="""
        import pytest

        @pytest.mark.kvm_snapshot("g", scope="module")
        @pytest.mark.parametrize("i", range(3))
        def test_t(i, app, seed, kvm_guest):
            disk = kvm_guest.domain.disk
            assert disk["app"] == "installed" and disk["seed"] == "seeded"
            assert disk.get("dirt", -1) == i - 1   # a module unit: tests see each other's changes
            disk["dirt"] = i
    """, test_b=SECOND_MODULE.replace('"g")', '"g", scope="module")'))
    pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly").assert_outcomes(passed=4)
    # The seed is the module's own scope: no layer; the app is one.
    assert ops(guest) == ["take base", "take main-L1", "hot main-L1", "hot base", "delete main-L1", "delete base"]


def test_a_fixture_that_fails_in_setup_checkpoints_nothing(pytester: pytest.Pytester, guest: FakeMachine) -> None:
    pytester.makepyfile(test_a="""
        import pytest

        @pytest.fixture(scope="session")
        def broken(kvm_guest_factory):
            kvm_guest_factory.get().domain.disk["half"] = "done"
            raise RuntimeError("install failed")

        @pytest.mark.kvm_snapshot("g")
        def test_t(broken):
            pass
    """)
    pytester.runpytest("--kvm-uri=fake://a").assert_outcomes(errors=1)
    assert ops(guest) == ["take base", "hot base", "delete base"]
    assert guest.disk == {"state": "clean"}


def test_the_factory_outside_a_marked_test_says_why(pytester: pytest.Pytester, guest: FakeMachine) -> None:
    pytester.makepyfile(test_a="""
        def test_unmarked(app):
            pass
    """)
    result = pytester.runpytest("--kvm-uri=fake://a")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*kvmsnap: kvm_guest_factory was used outside a test marked kvm_snapshot*"])


def test_a_wider_fixture_first_used_after_a_narrower_one_ended_errors_later_tests(
        pytester: pytest.Pytester, guest: FakeMachine) -> None:
    """A session fixture first set up on top of a module fixture's state loses it with the module."""
    pytester.makepyfile(test_a="""
        import pytest

        @pytest.mark.kvm_snapshot("g")
        def test_1(seed):
            pass

        @pytest.mark.kvm_snapshot("g")
        def test_2(seed, late):
            pass
    """, test_b="""
        import pytest

        @pytest.mark.kvm_snapshot("g")
        def test_3(late):
            pass
    """, conftest="""
        import pytest
        from tests.unit import fake_engine

        def pytest_kvmsnap_engine(config):
            return fake_engine.PROVIDED

        @pytest.fixture(scope="module")
        def seed(kvm_guest_factory):
            kvm_guest_factory.get().domain.disk["seed"] = 1

        @pytest.fixture(scope="session")
        def late(kvm_guest_factory):
            kvm_guest_factory.get().domain.disk["late"] = 1
    """)
    result = pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*the guest state of session fixture 'late' on 'g' was built on top of a fixture "
                                 "that was torn down before it*request 'late' in the first test of its scope*"])
    assert guest.disk == {"state": "clean"} and guest.saved == {}


def test_a_fixture_failing_beside_a_wider_one_makes_later_users_of_that_one_error(
        pytester: pytest.Pytester, guest: FakeMachine) -> None:
    """'app' set up, then its sibling 'broken' failed before the checkpoint: app stays cached but its
    state is reverted away, so a later test that uses it errors, naming both -- never runs without it."""
    pytester.makepyfile(test_a="""
        import pytest

        @pytest.fixture(scope="session")
        def broken():
            raise RuntimeError("install failed")

        @pytest.mark.kvm_snapshot("g")
        def test_1(app, broken):
            pass

        @pytest.mark.kvm_snapshot("g")
        def test_2(app, kvm_guest):
            assert kvm_guest.domain.disk.get("app") == "installed"
    """)
    result = pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*the guest state of session fixture 'app' was not kept: session fixture 'broken' "
                                 "failed in the same setup before it could be checkpointed; fix that fixture*"])
    assert guest.disk == {"state": "clean"} and guest.saved == {}


def golden(guest: FakeMachine) -> None:
    """A snapshot of the user's (no ownership record): never reverted to by a layer's end, never deleted."""
    guest.saved["golden"] = FakeSnapshot("golden", "mine", "running", {"state": "golden"}, guest.process)


def test_the_users_snapshot_is_the_lowest_layer(pytester: pytest.Pytester, guest: FakeMachine) -> None:
    golden(guest)
    pytester.makepyfile(test_a=STORY.replace('"g")', '"g", snapshot="golden")').replace(
        "assert disk.get(\"app\")", "assert disk[\"state\"] == \"golden\"; assert disk.get(\"app\")"))
    pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly").assert_outcomes(passed=3)
    assert guest.log[1] == "cold golden"  # this VM process never took it: a cold revert
    assert ops(guest)[2:4] == ["take main-L1", "take main-L2"]
    assert guest.disk == {"state": "clean"} and list(guest.saved) == ["golden"]


def test_tests_that_share_wider_fixtures_on_two_bases_error(pytester: pytest.Pytester, guest: FakeMachine) -> None:
    """The app was built on the run's baseline; a test from snapshot='golden' cannot have it."""
    golden(guest)
    pytester.makepyfile(test_a="""
        import pytest

        @pytest.mark.kvm_snapshot("g")
        def test_1(app):
            pass

        @pytest.mark.kvm_snapshot("g", snapshot="golden")
        def test_2(app):
            pass
    """)
    result = pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*guest 'g': this test starts from 'golden', but the state of session fixture "
                                 "'app' was built on 'kvmsnap-*' and those fixtures are still set up; give the "
                                 "tests that share wider fixtures one snapshot=*"])
    assert guest.disk == {"state": "clean"} and list(guest.saved) == ["golden"]


# --- the decisions alone -------------------------------------------------------

def test_wider_means_outlives_the_unit() -> None:
    assert is_wider("session", "function") and is_wider("module", "class")
    assert not is_wider("module", "module") and not is_wider("function", "class")


def test_a_fixture_ending_ends_its_layer_and_every_layer_above() -> None:
    stack = LayerStack()
    app, seed, late = Fixture(1, "app", "session"), Fixture(2, "seed", "module"), Fixture(3, "late", "session")
    from pytest_kvmsnap.layers import Layer

    stack.push("base", Layer("L1", (app,)))
    stack.push("other", Layer("L2", (seed,)))
    stack.push("x", Layer("L3", (late,)))
    assert stack.base == "base" and stack.top("base") == "L3"
    ended = stack.end(seed.key)
    assert [layer.snapshot for layer in ended] == ["L2", "L3"]
    assert carried_away(ended, seed.key) == [late]
    assert stack.top("base") == "L1"
    assert [layer.snapshot for layer in stack.take_ended()] == ["L3", "L2"]
    assert stack.end(seed.key) == []
    assert stack.conflict("base") is None and stack.conflict("golden") is not None
