"""When reverts happen: scopes, revert modes, baselines, end of session.

On libvirt's in-process test driver, so the plugin's decisions are checked fast
and without a daemon; tests/integration proves the same on a real QEMU guest.
"""

from __future__ import annotations

import pytest

from pytest_kvmsnap.engine import kept_for_user, owned_snapshots
from pytest_kvmsnap.libvirt.machine import LibvirtMachine
from tests.conftest import RevertLog, TestDriver
from tests.unit.helpers import run_unit as run
from tests.unit.helpers import three_tests


@pytest.fixture
def guest(testdriver: TestDriver) -> str:
    return testdriver.define()


def test_function_after_reverts_after_each_test(pytester, guest, revert_log: RevertLog, testdriver) -> None:  # type: ignore[no-untyped-def]
    before = testdriver.snapshots(guest)
    pytester.makepyfile(three_tests(guest))
    run(pytester).assert_outcomes(passed=3)
    assert revert_log.reasons() == [f"after function:test_function_after_reverts_after_each_test.py::test_t[{i}]"
                                     for i in (1, 2, 3)]
    assert testdriver.snapshots(guest) == before


@pytest.mark.parametrize(("mode", "expected"), [
    ("before", ["before", "before", "end of session"]),
    ("both", ["after", "after", "after"]),
    ("never", ["end of session"]),
])
def test_revert_modes(pytester, guest, revert_log, mode, expected) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(three_tests(guest, revert=mode))
    run(pytester).assert_outcomes(passed=3)
    assert [r.split(" function:")[0] for r in revert_log.reasons()] == expected


def test_on_failure_reverts_only_after_a_failed_unit(pytester, guest, revert_log) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(three_tests(guest, revert="on-failure").replace("{marker.get", "").replace(
        "i != 0", "i != 2"))
    run(pytester).assert_outcomes(passed=2, failed=1)
    assert revert_log.reasons() == ["after function:test_on_failure_reverts_only_after_a_failed_unit.py::test_t[2]",
                                    "end of session"]


def test_class_and_module_units(pytester, guest, revert_log) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(test_a=f"""
        import pytest
        pytestmark = pytest.mark.kvm_snapshot("{guest}", scope="class")
        class TestOne:
            def test_1(self, kvm_guest): pass
            def test_2(self, kvm_guest): pass
        def test_alone(kvm_guest): pass
    """, test_b=f"""
        import pytest
        pytestmark = pytest.mark.kvm_snapshot("{guest}", scope="module")
        def test_1(kvm_guest): pass
        def test_2(kvm_guest): pass
    """)
    run(pytester).assert_outcomes(passed=5)
    assert revert_log.reasons() == ["after class:test_a.py::TestOne", "after function:test_a.py::test_alone",
                                    "after module:test_b.py"]


def test_marker_alone_is_enough(pytester, guest, revert_log) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}")
        def test_no_fixture(): pass
    """)
    run(pytester).assert_outcomes(passed=1)
    assert revert_log.reasons() == ["after function:test_marker_alone_is_enough.py::test_no_fixture"]


def test_fixture_without_marker_uses_defaults(pytester, guest, revert_log) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile("def test_f(kvm_guest, kvm_connection): assert kvm_guest.domain.name() == kvm_guest.name")
    run(pytester, f"--kvm-domain={guest}", "--kvm-revert=never").assert_outcomes(passed=1)
    assert revert_log.reasons() == ["end of session"]


def test_named_snapshot_is_baseline_and_kept(pytester, guest, revert_log, testdriver) -> None:  # type: ignore[no-untyped-def]
    dom = testdriver.conn.lookupByName(guest)
    dom.snapshotCreateXML("<domainsnapshot><name>clean</name></domainsnapshot>", 0)
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}", snapshot="clean")
        def test_s(kvm_guest):
            assert kvm_guest.baseline == "clean"
    """)
    run(pytester).assert_outcomes(passed=1)
    entries = [(e["snapshot"], e["reason"].split(" ")[0]) for e in revert_log.entries() if "reason" in e]
    assert [e[0] for e in entries] == ["clean", "clean", entries[2][0]]
    assert entries[2][0].startswith("kvmsnap-") and entries[2][1] == "end"
    assert testdriver.snapshots(guest) == ["clean"]


def test_keep_snapshot(pytester, guest, testdriver) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(three_tests(guest))
    run(pytester, "--kvm-keep-snapshot").assert_outcomes(passed=3)
    kept = testdriver.snapshots(guest)
    assert len(kept) == 1 and kept[0].startswith("kvmsnap-")
    # It is the user's now, marked kept: no later run takes it for a dead run's orphan
    # (tests/integration/test_semantics.py shows it with a real next run).
    dom = testdriver.conn.lookupByName(guest)
    assert [r["name"] for r in kept_for_user(LibvirtMachine(dom)) if r.get("baseline")] == kept
    assert owned_snapshots(LibvirtMachine(dom)) == []


def test_several_guests_per_test(pytester, testdriver, revert_log) -> None:  # type: ignore[no-untyped-def]
    web, db = testdriver.define(), testdriver.define()
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{web}", "{db}")
        def test_both(kvm_guest, kvm_guests):
            assert kvm_guest.name == "{web}" and sorted(kvm_guests) == sorted(["{web}", "{db}"])
    """)
    run(pytester).assert_outcomes(passed=1)
    assert sorted(e["domain"] for e in revert_log.entries() if "reason" in e) == sorted([web, db])
    assert testdriver.snapshots(web) == testdriver.snapshots(db) == []


def test_manual_revert_and_summary(pytester, guest) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}")
        def test_m(kvm_guest):
            kvm_guest.revert()
            assert kvm_guest.is_dirty  # still in use by this test
    """)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "*= kvmsnap =*",
        f"{guest}: baseline kvmsnap-* taken in *, 2 revert(s), total *, median *",
        "*revert method for kvmsnap-*: restart (the TEST driver has no QEMU monitor)",
        "kvmsnap: slowest 1 reverts and waits",
        f"*s revert (restart)*{guest}  test_manual_revert_and_summary.py::test_m",
    ])
