"""Every semantic of the core plugin, on a real QEMU guest, checked from outside."""

from __future__ import annotations

import pytest

from pytest_kvmsnap.events import to_stdout
from pytest_kvmsnap.locking import GuestLock, default_lock_dir
from tests.integration.conftest import URI, RealGuest, run_inner

WRITE = "echo {v} > /data/marker; echo {v} > /tmp/marker"
CLEAN = "! ls /data/marker /tmp/marker 2>/dev/null"  # exit 0 only when neither exists


def three_dirty_tests(guest: str, marker: str = "") -> str:
    return f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}"{marker})
        @pytest.mark.parametrize("i", [1, 2, 3])
        def test_each_starts_clean(i, sh):
            assert sh.run("{CLEAN}").status == 0, "previous test's disk or RAM marker survived"
            sh.check("{WRITE.format(v='$RANDOM')}")
    """


LOCK_DIR = default_lock_dir()  # read now: some tests point XDG_RUNTIME_DIR elsewhere


def assert_as_found(guest: RealGuest, snapshots: list[str] | None = None) -> None:
    """Running, clean disk and RAM, the snapshots it had, no run record or lease, lock free."""
    assert guest.snapshots() == (snapshots or [])
    assert not guest.leased()
    assert guest.state() == 1  # running
    assert guest.console.run(CLEAN).status == 0
    if LOCK_DIR.is_dir():
        assert [r for r in GuestLock.records(LOCK_DIR) if r.domain == guest.name] == []
        lock = GuestLock(LOCK_DIR, guest.uri, guest.name)
        lock.acquire(0, to_stdout)  # raises if anyone still holds it
        lock.release()


@pytest.mark.parametrize("method", ["auto", "inplace", "restart"])
def test_disk_and_memory_restored_between_tests(inner: pytest.Pytester, guest_a: RealGuest, method: str) -> None:
    inner.makepyfile(three_dirty_tests(guest_a.name))
    result = run_inner(inner, f"--kvm-revert-method={method}")
    result.assert_outcomes(passed=3)
    expected = "restart*" if method == "restart" else "inplace (QEMU loadvm)"
    result.stdout.fnmatch_lines([f"{guest_a.name}: baseline kvmsnap-* 3 revert(s)*",
                                 f"*revert method for kvmsnap-*: {expected}"])
    assert_as_found(guest_a)


def test_class_and_module_units_share_state_inside(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    name = guest_a.name
    inner.makepyfile(test_a=f"""
        import pytest
        @pytest.mark.kvm_snapshot("{name}", scope="class")
        class TestFirst:
            def test_write(self, sh):
                sh.check("echo first > /data/marker; echo first > /tmp/marker")
            def test_still_there(self, sh):
                assert sh.check("cat /data/marker /tmp/marker") == "first\\nfirst"

        @pytest.mark.kvm_snapshot("{name}", scope="class")
        class TestSecond:
            def test_clean(self, sh):
                assert sh.run("{CLEAN}").status == 0
    """, test_b=f"""
        import pytest
        pytestmark = pytest.mark.kvm_snapshot("{name}", scope="module")
        def test_write(sh):
            assert sh.run("{CLEAN}").status == 0
            sh.check("echo mod > /tmp/marker")
        def test_still_there(sh):
            assert sh.check("cat /tmp/marker") == "mod"
    """, test_c=f"""
        import pytest
        @pytest.mark.kvm_snapshot("{name}")
        def test_clean_after_module(sh):
            assert sh.run("{CLEAN}").status == 0
    """)
    run_inner(inner).assert_outcomes(passed=6)
    assert_as_found(guest_a)


def test_on_failure_and_never(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    name = guest_a.name
    inner.makepyfile(test_f=f"""
        import pytest
        pytestmark = pytest.mark.kvm_snapshot("{name}", revert="on-failure")
        def test_1_passes(sh):
            sh.check("echo one > /tmp/marker")
        def test_2_sees_it_then_fails(sh):
            assert sh.check("cat /tmp/marker") == "one"
            sh.check("echo two > /data/marker")
            assert False, "deliberate"
        def test_3_clean_after_failure(sh):
            assert sh.run("{CLEAN}").status == 0
    """, test_n=f"""
        import pytest
        pytestmark = pytest.mark.kvm_snapshot("{name}", revert="never")
        def test_1(sh):
            sh.check("echo n > /data/marker")
        def test_2_accumulates(sh):
            assert sh.check("cat /data/marker") == "n"
    """)
    run_inner(inner).assert_outcomes(passed=4, failed=1)
    assert_as_found(guest_a)  # "never" still restores at the end of the session


def test_before_mode(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    inner.makepyfile(three_dirty_tests(guest_a.name, ', revert="before"'))
    result = run_inner(inner)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"{guest_a.name}: baseline * 3 revert(s)*"])  # 2 before + end of session
    assert_as_found(guest_a)


def test_several_guests_per_test(inner: pytest.Pytester, guest_a: RealGuest, guest_b: RealGuest) -> None:
    inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest_a.name}", "{guest_b.name}")
        @pytest.mark.parametrize("i", [1, 2])
        def test_both(i, shs):
            for sh in shs.values():
                assert sh.run("{CLEAN}").status == 0
                sh.check("{WRITE.format(v='x')}")
    """)
    run_inner(inner).assert_outcomes(passed=2)
    assert_as_found(guest_a)
    assert_as_found(guest_b)


def test_existing_snapshot_used_and_kept(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    dom = guest_a.domain()
    guest_a.console.check("echo user > /data/marker; echo user > /tmp/marker")
    dom.snapshotCreateXML("<domainsnapshot><name>it-user</name></domainsnapshot>", 0)
    guest_a.console.check("rm /data/marker /tmp/marker")  # the state the run finds
    try:
        inner.makepyfile(f"""
            import pytest
            @pytest.mark.kvm_snapshot("{guest_a.name}", snapshot="it-user")
            @pytest.mark.parametrize("i", [1, 2])
            def test_from_user_snapshot(i, sh, kvm_guest):
                assert kvm_guest.baseline == "it-user"
                assert sh.check("cat /data/marker /tmp/marker") == "user\\nuser"
                sh.check("echo changed > /data/marker")
        """)
        run_inner(inner).assert_outcomes(passed=2)
        assert guest_a.snapshots() == ["it-user"]
        assert dom.snapshotCurrent().getName() == "it-user"  # libvirt's "current" pointer is back
        assert guest_a.console.run(CLEAN).status == 0  # back as found, not as the snapshot
    finally:
        dom.snapshotLookupByName("it-user").delete(0)


def test_strict_inplace_refuses_what_needs_a_qemu_restart(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    """A user snapshot this QEMU never loaded can only be reached by libvirt's revert."""
    dom = guest_a.domain()
    dom.snapshotCreateXML("<domainsnapshot><name>it-user</name></domainsnapshot>", 0)
    try:
        inner.makepyfile(f"""
            import pytest
            @pytest.mark.kvm_snapshot("{guest_a.name}", snapshot="it-user")
            def test_from_user_snapshot(sh):
                sh.check("echo changed > /data/marker")
        """)
        result = run_inner(inner, "--kvm-revert-method=inplace")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*kvm_revert_method=inplace: cannot revert * to 'it-user' in place: "
                                     "this QEMU process has not taken or loaded 'it-user'*--kvm-revert-method=auto*"])
        assert guest_a.snapshots() == ["it-user"]
        assert guest_a.console.run(CLEAN).status == 0
    finally:
        dom.snapshotLookupByName("it-user").delete(0)


def test_unknown_domain_and_snapshot_on_real_libvirt(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("no-such-guest")
        def test_domain(): pass
        @pytest.mark.kvm_snapshot("{guest_a.name}", snapshot="no-such-snapshot")
        def test_snapshot(): pass
    """)
    result = run_inner(inner)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        f"*no domain named 'no-such-guest' at {URI}. Domains there: *{guest_a.name}*",
        f"*'{guest_a.name}' has no snapshot named 'no-such-snapshot'. Its snapshots: none*",
    ])
    assert_as_found(guest_a)


def test_daemon_not_running(inner: pytest.Pytester) -> None:
    inner.makepyfile("""
        import pytest
        @pytest.mark.kvm_snapshot("any")
        def test_x(): pass
    """)
    result = inner.runpytest_subprocess("--kvm-uri=qemu+unix:///system?socket=/run/nowhere/libvirt-sock")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*libvirtd does not seem to be running: start it*"])


def test_a_kept_baseline_is_the_users_and_the_next_run_leaves_it(inner: pytest.Pytester,
                                                                  guest_a: RealGuest) -> None:
    """--kvm-keep-snapshot: once the run is over, its baseline is no dead run's orphan."""
    inner.makepyfile(three_dirty_tests(guest_a.name))
    run_inner(inner, "--kvm-keep-snapshot").assert_outcomes(passed=3)
    kept = guest_a.snapshots()
    assert len(kept) == 1 and kept[0].startswith("kvmsnap-")
    after = run_inner(inner)
    after.assert_outcomes(passed=3)
    assert "left by dead run" not in after.stdout.str()
    assert guest_a.snapshots() == kept
    assert_as_found(guest_a, snapshots=kept)
    guest_a.domain().snapshotLookupByName(kept[0]).delete(0)
