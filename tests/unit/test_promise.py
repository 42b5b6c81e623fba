"""The promise on every path: a marked test runs on a protected guest, or errors.

Markers added any documented way, and faults injected into the plugin's own
libvirt layer (a dropped connection, a refused snapshot) at each step of a
test's setup and teardown.  On libvirt's test driver, in-process, so the fault
can be injected; tests/integration/test_promise.py proves the same stories on
a real guest with a real libvirtd restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pytest_kvmsnap import hypervisor
from pytest_kvmsnap.exceptions import ConnectionFailed, ConnectionLost, KvmSnapError
from pytest_kvmsnap.libvirt import connection
from pytest_kvmsnap.libvirt.snapshots import DomainSnapshots
from tests.conftest import RECORDER, RevertLog, TestDriver
from tests.unit.helpers import run_unit, three_tests


@pytest.fixture
def guest(testdriver: TestDriver) -> str:
    return testdriver.define()


def failing(real: Callable[..., Any], times: int, error: Callable[[], Exception],
            run_first: bool = False) -> Callable[..., Any]:
    """``real`` that fails its first ``times`` calls with ``error()`` (after running, if ``run_first``)."""
    calls = [0]

    def call(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            if run_first:
                real(*args, **kwargs)
            raise error()
        return real(*args, **kwargs)
    return call


def lost() -> ConnectionLost:
    return ConnectionLost("test:///default", "doing it", "End of file while reading data: Input/output error",
                          "libvirtd")


# --- markers added however pytest documents ---------------------------------

UNMARKED_TESTS = """
    import pytest
    @pytest.mark.parametrize("i", [1, 2, 3])
    def test_t(i):
        pass
"""


@pytest.mark.parametrize("hook", [
    "def pytest_collection_modifyitems(items):\n    for item in items:\n        item.add_marker(MARK)",
    "def pytest_itemcollected(item):\n    item.add_marker(MARK)",
    "def pytest_runtest_setup(item):\n    item.add_marker(MARK)",
])
def test_marker_added_by_a_conftest_hook_is_honoured(pytester, guest, revert_log: RevertLog, hook) -> None:  # type: ignore[no-untyped-def]
    pytester.makeconftest(RECORDER + f"\nimport pytest\nMARK = pytest.mark.kvm_snapshot({guest!r})\n" + hook)
    pytester.makepyfile(UNMARKED_TESTS)
    result = run_unit(pytester, "-v")
    result.assert_outcomes(passed=3)
    assert len(revert_log.reasons()) == 3
    result.stdout.fnmatch_lines([f"{guest}: baseline kvmsnap-* 3 revert(s)*"])


def test_marker_from_a_plugin_hook_with_bad_arguments_stops_the_run(pytester, guest) -> None:  # type: ignore[no-untyped-def]
    pytester.makeconftest("""
        import pytest
        def pytest_collection_modifyitems(items):
            for item in items:
                item.add_marker(pytest.mark.kvm_snapshot(revert="sometimes"))
    """)
    pytester.makepyfile(UNMARKED_TESTS)
    result = run_unit(pytester, f"--kvm-domain={guest}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid kvm_snapshot usage:",
                                 "*test_t?1?: invalid *revert='sometimes' is not one of*"])


def test_marker_added_by_a_fixture_errors_the_test(pytester, guest, testdriver) -> None:  # type: ignore[no-untyped-def]
    """Too late to prepare the guest: the test errors and says how to mark it instead."""
    pytester.makepyfile(f"""
        import pytest
        @pytest.fixture
        def late(request):
            request.applymarker(pytest.mark.kvm_snapshot({guest!r}))
        def test_late(late):
            raise AssertionError("must not run")
    """)
    result = run_unit(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_late was marked kvm_snapshot after its setup began*mark it at collection*"])
    assert "must not run" not in result.stdout.str()
    assert testdriver.snapshots(guest) == []


def test_marker_for_another_guest_added_by_a_fixture_errors_the_test(pytester, testdriver) -> None:  # type: ignore[no-untyped-def]
    """Setup protected the default guest; the fixture's marker asks for another: error."""
    default, other = testdriver.define(), testdriver.define()
    pytester.makepyfile(f"""
        import pytest
        @pytest.fixture
        def late(request):
            request.applymarker(pytest.mark.kvm_snapshot({other!r}))
        def test_late(kvm_guest, late):
            raise AssertionError("must not run")
    """)
    result = run_unit(pytester, f"--kvm-domain={default}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_late was marked kvm_snapshot after its setup began*"])
    assert testdriver.snapshots(default) == testdriver.snapshots(other) == []


@pytest.mark.parametrize("scope", ["package", "session"])
def test_wide_scopes_run_without_xdist(pytester, guest, revert_log, scope) -> None:  # type: ignore[no-untyped-def]
    """One process spreads no unit: package and session scopes are not refused."""
    pytester.makepyfile(three_tests(guest, scope=scope))
    run_unit(pytester).assert_outcomes(passed=3)
    assert revert_log.reasons() == ["after session" if scope == "session" else f"after dir:{pytester.path}"]


# --- failure paths ------------------------------------------------------------


def test_lost_connection_while_taking_the_baseline_is_retried(pytester, guest, revert_log, testdriver,  # type: ignore[no-untyped-def]
                                                              monkeypatch) -> None:
    """libvirt finished the snapshot but the call failed: reconnect, adopt it, go on."""
    monkeypatch.setattr(DomainSnapshots, "take_baseline",
                        failing(DomainSnapshots.take_baseline, 1, lost, run_first=True))
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*lost the connection to libvirtd at test:///default while doing it*trying once more",
                                 f"*{guest}: using baseline kvmsnap-* that the hypervisor finished after*"])
    assert testdriver.snapshots(guest) == []


def test_a_refused_baseline_is_cached_released_and_cleaned_up(pytester, guest, testdriver, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A real refusal fails every test fast, holds nothing, and leaves no snapshot of the run."""
    refused = failing(DomainSnapshots.take_baseline, 9,
                      lambda: KvmSnapError("cannot take a baseline snapshot: refused"), run_first=True)
    monkeypatch.setattr(DomainSnapshots, "take_baseline", refused)
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester)
    result.assert_outcomes(errors=3)
    for i in (1, 2, 3):  # the first one's error, then the cached verdict
        result.stdout.fnmatch_lines([f"*ERROR at setup of test_t[[]{i}[]]*",
                                     "*cannot take a baseline snapshot: refused"])
    assert "qcow2" not in result.stdout.str()
    assert testdriver.snapshots(guest) == []


def test_lost_connection_twice_during_baseline_errors_one_test_not_the_run(pytester, guest, revert_log,  # type: ignore[no-untyped-def]
                                                                          testdriver, monkeypatch) -> None:
    monkeypatch.setattr(DomainSnapshots, "take_baseline", failing(DomainSnapshots.take_baseline, 2, lost))
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_t[[]1[]]*",
                                 "kvmsnap: lost the connection to libvirtd*libvirtd was restarted or stopped"])
    assert "qcow2" not in result.stdout.str()
    assert len([e for e in revert_log.entries() if "baseline" in e]) == 1
    assert testdriver.snapshots(guest) == []


def test_lost_connection_during_a_revert_is_retried(pytester, guest, revert_log, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(DomainSnapshots, "revert_cold", failing(DomainSnapshots.revert_cold, 1, lost))
    pytester.makepyfile(three_tests(guest))
    run_unit(pytester).assert_outcomes(passed=3)
    assert len(revert_log.reasons()) == 3


def test_a_revert_that_could_not_be_made_is_owed_by_the_next_unit(pytester, guest, revert_log,  # type: ignore[no-untyped-def]
                                                                 monkeypatch) -> None:
    """Its test errors; the next test, although revert='after', starts with the owed revert."""
    monkeypatch.setattr(DomainSnapshots, "revert_cold", failing(DomainSnapshots.revert_cold, 2, lost))
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester)
    result.assert_outcomes(passed=3, errors=1)  # the error is test 1's teardown
    reasons = [r.split(" function:")[0] for r in revert_log.reasons()]
    assert reasons == ["before", "after", "after"]


def test_teardown_with_libvirtd_gone_releases_the_guest(pytester, guest, revert_log, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """No reconnect possible after test 1: the lock is released and the next test reverts first."""
    monkeypatch.setattr(hypervisor, "RECONNECT_TIMEOUT", 0.2)
    calls = {"alive": 0}
    real_alive, real_open = connection.is_alive, connection.open_connection

    def is_alive(conn):  # type: ignore[no-untyped-def]
        calls["alive"] += 1
        return calls["alive"] != 1 and real_alive(conn)  # the check at test 1's teardown fails

    def open_connection(uri):  # type: ignore[no-untyped-def]
        if calls["alive"] == 1 and calls.setdefault("down", 0) < 3:  # the reconnect's two tries, then one more
            calls["down"] += 1
            raise ConnectionFailed(f"cannot open libvirt connection {uri!r}: libvirtd does not seem to be running")
        return real_open(uri)

    monkeypatch.setattr(connection, "is_alive", is_alive)
    monkeypatch.setattr(connection, "open_connection", open_connection)
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*libvirtd did not answer again within 0 s*"])
    reasons = [r.split(" function:")[0] for r in revert_log.reasons()]
    assert reasons == ["before", "after", "after"]


def test_a_refused_lock_directory_is_one_line(pytester, guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The first test creates the run's coordinator; its refusal is the test's one-line error."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    pytester.makepyfile(three_tests(guest))
    result = run_unit(pytester, f"--kvm-lock-dir={tmp_path / 'link'}")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["kvmsnap: lock directory * is a symlink; point kvm_lock_dir at a real directory"])
    assert "ConfigError" not in result.stdout.str()


def test_a_unit_scope_added_by_a_conftest_hook_is_refused_where_xdist_spreads_it(pytester) -> None:  # type: ignore[no-untyped-def]
    """The xdist check applies to late markers too: refused with the reason, before any libvirt call."""
    pytester.makeconftest("""
        import pytest
        def pytest_collection_modifyitems(items):
            for item in items:
                item.add_marker(pytest.mark.kvm_snapshot("no-such-guest", scope="module"))
    """)
    pytester.makepyfile(UNMARKED_TESTS)
    result = run_unit(pytester, "-n", "2", "--dist", "load")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*uses scope='module', whose tests must run on one xdist worker, "
                                 "but --dist load spreads them*"])
