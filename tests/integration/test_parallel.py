"""Parallel and killed runs on a real guest: xdist workers, concurrent runs, orphans."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import RECORDER
from tests.integration.conftest import RealGuest, Spawn, run_inner
from tests.integration.test_semantics import CLEAN, assert_as_found

EXCLUSIVE = """
    import os, time, pytest
    @pytest.mark.kvm_snapshot("{name}")
    @pytest.mark.parametrize("i", range({n}))
    def test_exclusive(i, sh):
        open(f"started-{{os.getpid()}}", "w").close()  # a race the test forces, not one it waits out
        assert sh.run("{clean}").status == 0, "guest not clean at test start"
        me = f"{{os.getpid()}}-{{i}}"
        sh.check(f"echo {{me}} > /tmp/marker; echo {{me}} > /data/marker")
        time.sleep({pause})  # another worker would overwrite the marker now, without the lock
        assert sh.check("cat /tmp/marker /data/marker") == f"{{me}}\\n{{me}}"
"""


def exclusive_tests(name: str, n: int = 4, pause: float = 0.5) -> str:
    return EXCLUSIVE.format(name=name, n=n, clean=CLEAN, pause=pause)


def wait_until_started(inner: pytest.Pytester, run) -> None:  # type: ignore[no-untyped-def]
    """Until ``run`` is inside its first test (it holds the guest): a slow host may take long."""
    deadline = time.monotonic() + 120
    while not list(inner.path.glob(f"started-{run.pid}")):
        assert time.monotonic() < deadline and run.poll() is None, "the first run never started a test"
        time.sleep(0.05)


def log_entries(path) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_xdist_workers_take_turns_and_share_one_baseline(inner, guest_a: RealGuest, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    log = inner.path / "events.jsonl"
    monkeypatch.setenv("KVMSNAP_REVERT_LOG", str(log))
    inner.makepyfile(conftest_recorder=RECORDER)
    inner.makepyfile(exclusive_tests(guest_a.name))
    result = run_inner(inner, "-n", "2", "-p", "conftest_recorder")
    result.assert_outcomes(passed=4)
    baselines = [e for e in log_entries(log) if "baseline" in e]
    assert len(baselines) == 1, baselines  # one baseline for the run, whatever the workers
    result.stdout.fnmatch_lines([f"{guest_a.name}: baseline kvmsnap-* 4 revert(s)*"])
    assert_as_found(guest_a)


def test_second_run_waits_for_the_first(inner, guest_a: RealGuest, spawn) -> None:  # type: ignore[no-untyped-def]
    inner.makepyfile(exclusive_tests(guest_a.name, n=3, pause=1.0))
    first = spawn("first")
    wait_until_started(inner, first)
    second = spawn("second")
    assert first.wait(120) == 0, (inner.path / "first.out").read_text()
    assert second.wait(120) == 0, (inner.path / "second.out").read_text()
    out = (inner.path / "second.out").read_text()
    assert f"guest '{guest_a.name}' is in use by run" in out
    assert_as_found(guest_a)


def test_runs_with_different_lock_dirs_still_take_turns(inner, guest_a: RealGuest, spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two users (or hosts) that share no lock directory: the run's lease on the hypervisor keeps them apart."""
    inner.makepyfile(exclusive_tests(guest_a.name, n=3, pause=1.0))
    first = spawn("first", f"--kvm-lock-dir={tmp_path / 'a'}")
    wait_until_started(inner, first)
    second = spawn("second", f"--kvm-lock-dir={tmp_path / 'b'}")
    assert first.wait(120) == 0, (inner.path / "first.out").read_text()
    assert second.wait(120) == 0, (inner.path / "second.out").read_text()
    out = (inner.path / "second.out").read_text()
    assert f"guest '{guest_a.name}' is in use by run" in out and "its lease on the hypervisor until" in out
    assert_as_found(guest_a)


def test_lock_timeout_zero_fails_fast(inner, guest_a: RealGuest, spawn) -> None:  # type: ignore[no-untyped-def]
    inner.makepyfile(exclusive_tests(guest_a.name, n=2, pause=3.0))
    first = spawn("first")
    wait_until_started(inner, first)
    result = run_inner(inner, "--kvm-lock-timeout=0")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*gave up after 0 s waiting for the guest lock; held by run * (pid *), *"])
    assert first.wait(120) == 0
    assert_as_found(guest_a)


def start_run_stuck_mid_test(inner, spawn, guest: RealGuest, name: str, *args: str):  # type: ignore[no-untyped-def]
    """Spawn a run whose test damages the guest's disk and RAM, then hangs; return once it has."""
    inner.makepyfile(**{f"test_{name}": f"""
        import time, pytest
        @pytest.mark.kvm_snapshot("{guest.name}")
        def test_stuck_mid_test(sh):
            sh.check("echo damage > /data/marker; echo damage > /tmp/marker")
            open("dirty-now", "w").close()
            time.sleep(600)
    """})
    run = spawn(name, *args)
    deadline = time.monotonic() + 60
    while not (inner.path / "dirty-now").exists():
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.1)
    return run


def next_run_finds_it_clean(inner, guest: RealGuest) -> pytest.RunResult:  # type: ignore[no-untyped-def]
    """After a killed run: one more run, whose only test asserts the guest is clean."""
    (inner.path / "test_victim.py").unlink()
    inner.makepyfile(test_next=f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest.name}")
        def test_clean(sh):
            assert sh.run("{CLEAN}").status == 0
    """)
    result = run_inner(inner)
    result.assert_outcomes(passed=1)
    return result


def module_unit_tests(guest: str) -> str:
    """Four tests of one module-scoped unit: each relies on the state the previous one left."""
    return f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}", scope="module")
        @pytest.mark.parametrize("i", range(4))
        def test_m(i, sh):
            if i:
                assert sh.check("cat /tmp/marker") == "m"
            sh.check("echo m > /tmp/marker")
    """


def test_killed_run_is_repaired_by_the_next(inner, guest_a: RealGuest, spawn) -> None:  # type: ignore[no-untyped-def]
    victim = start_run_stuck_mid_test(inner, spawn, guest_a, "victim")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert [s for s in guest_a.snapshots() if s.startswith("kvmsnap-")], "the killed run left no trace?"
    assert guest_a.console.check("cat /data/marker") == "damage"
    # The next run finds the orphan, puts the guest back, and goes on.
    result = next_run_finds_it_clean(inner, guest_a)
    result.stdout.fnmatch_lines([f"kvmsnap: {guest_a.name}: restored to kvmsnap-* left by dead run * "
                                 "and deleted 1 orphan snapshot(s)"])
    assert_as_found(guest_a)


def test_crashed_xdist_worker_leaves_no_dirty_guest(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    inner.makepyfile(f"""
        import os, pytest
        @pytest.mark.kvm_snapshot("{guest_a.name}")
        def test_a_crashes(sh):
            sh.check("echo crash > /data/marker; echo crash > /tmp/marker")
            os._exit(1)

        @pytest.mark.kvm_snapshot("{guest_a.name}")
        @pytest.mark.parametrize("i", range(3))
        def test_b_clean(i, sh):
            assert sh.run("{CLEAN}").status == 0
    """)
    result = run_inner(inner, "-n", "2")
    result.assert_outcomes(passed=3, failed=1)
    assert_as_found(guest_a)


def test_unit_scopes_need_grouped_distribution(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    inner.makepyfile(module_unit_tests(guest_a.name))
    refused = run_inner(inner, "-n", "2", "--dist", "load")
    refused.assert_outcomes(errors=4)
    refused.stdout.fnmatch_lines(["*scope='module', whose tests must run on one xdist worker, but --dist "
                                  "load spreads them. Use --dist loadscope*"])
    assert "INTERNALERROR" not in refused.stdout.str()
    run_inner(inner, "-n", "2", "--dist", "loadscope").assert_outcomes(passed=4)
    run_inner(inner, "-n", "2", "--dist", "loadfile").assert_outcomes(passed=4)
    assert_as_found(guest_a)


def test_unit_scopes_under_loadgroup_are_grouped_or_refused(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    """Grouped where xdist's loadgroup works; refused, never split, where it does not (xdist#1386)."""
    inner.makepyfile(module_unit_tests(guest_a.name))
    result = run_inner(inner, "-n", "2", "--dist", "loadgroup")
    if "does not group tests with this pytest" in result.stdout.str():
        result.assert_outcomes(errors=4)
    else:
        result.assert_outcomes(passed=4)
    assert_as_found(guest_a)


@pytest.mark.parametrize("bad", ["symlink", "others"])
def test_unsafe_lock_dir_is_refused(inner, guest_a: RealGuest, tmp_path, bad: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "real"
    target.mkdir(mode=0o777)
    target.chmod(0o777)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    if bad == "symlink":
        (runtime / "pytest-kvmsnap").symlink_to(target)
    else:
        (runtime / "pytest-kvmsnap").mkdir()
        (runtime / "pytest-kvmsnap").chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    inner.makepyfile(exclusive_tests(guest_a.name, n=1, pause=0))
    result = run_inner(inner)
    result.assert_outcomes(errors=1)
    expected = "is a symlink" if bad == "symlink" else "is writable by others or not yours"
    result.stdout.fnmatch_lines([f"*lock directory * {expected}*"])
    assert_as_found(guest_a)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_restores_the_guest(inner, guest_a: RealGuest, sig: int, spawn) -> None:  # type: ignore[no-untyped-def]
    run = start_run_stuck_mid_test(inner, spawn, guest_a, "run")
    os.kill(run.pid, sig)
    assert run.wait(60) != 0
    out = (inner.path / "run.out").read_text()
    assert "= kvmsnap =" in out, out
    assert_as_found(guest_a)


def test_a_second_interrupt_during_the_restore_leaves_at_once_and_cleanup_repairs(
        inner: pytest.Pytester, guest_a: RealGuest, spawn: Spawn) -> None:
    """Ctrl-C mid-test, then Ctrl-C again while the run restores the guest: one line, then --kvm-cleanup."""
    inner.makeconftest(inner.path.joinpath("conftest.py").read_text() + """
import os, signal

def pytest_kvmsnap_before_revert(config, domain, snapshot, reason):
    if reason == "end of session":
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while the guest is being restored
""")
    run = start_run_stuck_mid_test(inner, spawn, guest_a, "run")
    os.kill(run.pid, signal.SIGINT)
    assert run.wait(60) == pytest.ExitCode.INTERRUPTED
    out = (inner.path / "run.out").read_text()
    assert (f"kvmsnap: interrupted while restoring the guests; left unrestored: {guest_a.name}. "
            "Run `pytest --kvm-cleanup`") in out, out
    assert "Traceback" not in out, out
    assert guest_a.snapshots() != [], "the run was to leave its snapshot for the cleanup"
    (inner.path / "test_run.py").unlink()
    cleanup = run_inner(inner, "--kvm-cleanup", f"--kvm-domain={guest_a.name}")
    assert cleanup.ret == 0
    cleanup.stdout.fnmatch_lines([f"*{guest_a.name}: restored to kvmsnap-* left by dead run*"])
    assert_as_found(guest_a)


def test_units_that_wait_for_each_others_guest_fail_fast(inner: pytest.Pytester, guest_a: RealGuest,
                                                         guest_b: RealGuest) -> None:
    """Two module units on two workers: each holds its guest, then needs the other's."""
    first, second = guest_a.name, guest_b.name
    for name, mine in (("one", first), ("two", second)):
        inner.makepyfile(**{f"test_{name}": f"""
            import time, pytest
            @pytest.mark.kvm_snapshot("{mine}", scope="module")
            def test_1_holds_mine(sh):
                time.sleep(4)  # both workers hold their own guest now
            @pytest.mark.kvm_snapshot("{first}", "{second}", scope="module")
            def test_2_needs_both():
                pass
        """})
    start = time.monotonic()
    result = run_inner(inner, "-n", "2", "--dist", "loadfile", "--kvm-lock-timeout=120")
    assert time.monotonic() - start < 60, "the deadlock was waited out"
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 2 and outcomes.get("errors", outcomes.get("error", 0)) >= 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*kvmsnap: deadlock: this process holds '*' and waits for '*'; '*' is held by pid "
                                 "* (in test_*.py::test_*), which waits for '*'. Waiting would last until*"])
    assert_as_found(guest_a)
    assert_as_found(guest_b)
