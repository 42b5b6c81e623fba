"""The coordinator against a second engine (tests/unit/fake_engine.py), no hypervisor at all.

The same promise as on libvirt: each test starts on the baseline, whatever the
last one did or whatever failed around it; what cannot be protected errors
before it runs; the guest ends as found.  And: nothing above engine.py needs
libvirt to keep it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pytest_kvmsnap.config import Settings, Spec, Wait
from pytest_kvmsnap.coordinator import Coordinator
from pytest_kvmsnap.engine import Capabilities, refusal
from pytest_kvmsnap.exceptions import ConfigError, LeaseTimeout, RevertFailed
from pytest_kvmsnap.ownership import LeaseRecord, Owner, owner_description
from tests.unit import fake_engine
from tests.unit.fake_engine import FULL, FakeHost, FakeKind, FakeSnapshot

SPEC = Spec(("g",), "after", "function", None)


def coordinator(tmp_path: Path, kind: FakeKind, *, events: list[object] | None = None,
                settings: dict[str, object] | None = None) -> Coordinator:
    options: dict[str, object] = {"uri": "fake://a", "lock_timeout": 3.0, **(settings or {})}
    return Coordinator(Settings(**options), "run1", tmp_path, engine_kind=kind,  # type: ignore[arg-type]
                       report=(events if events is not None else []).append)


def run_test(coord: Coordinator, n: int, body: object = None) -> None:
    coord.start_test(SPEC, f"t{n}", f"test_{n}")
    if callable(body):
        body()


def test_every_test_starts_on_the_baseline_and_the_guest_ends_as_found(tmp_path: Path) -> None:
    host = FakeHost()
    guest = host.add("g", state="clean")
    coord = coordinator(tmp_path, FakeKind(a=host))
    for n in range(3):
        coord.start_test(SPEC, f"t{n}", f"test_{n}")
        assert guest.disk == {"state": "clean"}, "a test saw the last one's change"
        assert host.leases["g"][1].holder.run_id == "run1"  # held on the hypervisor while in use
        guest.disk["state"] = f"broken by test {n}"
        coord.end_test(SPEC, {"g": None})
    assert coord.finish() == []
    assert guest.disk == {"state": "clean"}
    assert guest.saved == {} and host.leases == {}  # nothing of the run is left
    # Taken once; every revert in place, into the process that took the baseline.
    assert guest.log == ["take kvmsnap-run1", *["hot kvmsnap-run1"] * 3, "delete kvmsnap-run1"]


def test_a_guest_that_died_during_a_test_is_restored_cold_then_hot_again(tmp_path: Path) -> None:
    host = FakeHost()
    guest = host.add("g", state="clean")
    coord = coordinator(tmp_path, FakeKind(a=host))
    coord.start_test(SPEC, "t0", "test_0")
    guest.disk["state"] = "dirty"
    guest.crash()
    with pytest.raises(RevertFailed, match="went down during the test: its VM process exited"):
        coord.end_test(SPEC, {"g": None})
    assert guest.running and guest.disk == {"state": "clean"}
    run_test(coord, 1, lambda: guest.disk.update(state="dirty"))
    coord.end_test(SPEC, {"g": None})
    assert coord.finish() == []
    # A cold revert starts a new VM process from the baseline: that one may load it in place.
    assert guest.log[1:3] == ["cold kvmsnap-run1", "hot kvmsnap-run1"]


def test_a_failed_hot_revert_falls_back_to_a_cold_one(tmp_path: Path) -> None:
    host = FakeHost()
    guest = host.add("g", state="clean")
    coord = coordinator(tmp_path, FakeKind(a=host))
    run_test(coord, 0, lambda: guest.disk.update(state="dirty"))
    guest.fail_hot = True
    coord.end_test(SPEC, {"g": None})
    assert guest.disk == {"state": "clean"} and "cold kvmsnap-run1" in guest.log
    assert coord.finish() == []


def test_a_dead_runs_orphan_is_repaired_before_the_baseline(tmp_path: Path) -> None:
    host = FakeHost()
    guest = host.add("g", state="mid-test of a killed run")
    dead = Owner("deadrun", 2**22 + 17, os.uname().nodename, 1.0, "gone")
    guest.saved["kvmsnap-deadrun"] = FakeSnapshot("kvmsnap-deadrun", owner_description(dead), "running",
                                                  {"state": "as the dead run found it"}, 1)
    coord = coordinator(tmp_path, FakeKind(a=host))
    coord.start_test(SPEC, "t0", "test_0")
    assert guest.disk == {"state": "as the dead run found it"}
    coord.end_test(SPEC, {"g": None})
    assert coord.finish() == []
    assert guest.saved == {} and guest.disk == {"state": "as the dead run found it"}
    assert guest.log[:3] == ["cold kvmsnap-deadrun", "delete kvmsnap-deadrun", "take kvmsnap-run1"]


def test_a_guest_another_hosts_live_run_leases_is_waited_for_and_never_touched(tmp_path: Path) -> None:
    host = FakeHost()
    guest = host.add("g", state="theirs")
    other = Owner("otherrun", 4242, "elsewhere", 1.0, "x")
    host.leases["g"] = ("lease-x", LeaseRecord("g", other, time.time() + 600))
    events: list[object] = []
    coord = coordinator(tmp_path, FakeKind(a=host), events=events, settings={"lock_timeout": 0.5})
    with pytest.raises(LeaseTimeout, match=r"held by run otherrun \(pid 4242 on elsewhere\), its lease"):
        coord.start_test(SPEC, "t0", "test_0")
    assert any("in use by run otherrun" in str(event) for event in events)
    assert coord.finish() == []
    assert guest.log == [] and host.leases["g"][0] == "lease-x"


def test_a_dropped_connection_is_reopened_before_the_next_test(tmp_path: Path) -> None:
    host = FakeHost()
    guest = host.add("g", state="clean")
    kind = FakeKind(a=host)
    events: list[object] = []
    coord = coordinator(tmp_path, kind, events=events)
    run_test(coord, 0, lambda: guest.disk.update(state="dirty"))
    coord.end_test(SPEC, {"g": None})
    host.dropped = True  # the daemon restarted between tests; the guest's VM lives on
    run_test(coord, 1)
    assert kind.opened >= 2 and guest.disk == {"state": "clean"}
    assert any("reconnected to fake://a" in str(event) for event in events)
    coord.end_test(SPEC, {"g": None})
    assert coord.finish() == []


@pytest.mark.parametrize(("capabilities", "settings", "why"), [
    (Capabilities(False, True, True, True, True, True, True), {"revert_method": "inplace"}, "no in-place revert"),
    (Capabilities(True, False, True, True, True, True, True), {}, "do not keep the guest's memory"),
    (Capabilities(True, True, True, False, True, True, True), {}, "keeps no leases"),
    (Capabilities(True, True, True, True, False, True, True), {"wait": Wait("agent")}, "no guest agent"),
])
def test_what_an_engine_cannot_do_is_refused_before_the_guest_is_touched(
        tmp_path: Path, capabilities: Capabilities, settings: dict[str, object], why: str) -> None:
    host = FakeHost(capabilities=capabilities)
    guest = host.add("g", state="clean")
    coord = coordinator(tmp_path, FakeKind(a=host), settings=settings)
    with pytest.raises(ConfigError, match=f"the hypervisor at fake://a cannot serve this run: .*{why}"):
        coord.start_test(SPEC, "t0", "test_0")
    assert coord.finish() == []
    assert guest.log == [] and guest.saved == {} and host.leases == {}


def test_an_engine_without_hot_reverts_serves_auto_with_cold_ones(tmp_path: Path) -> None:
    """``auto`` is allowed: every revert is cold, slower but as safe."""
    assert refusal(Capabilities(False, True, True, True, True, True, True), clones=False, revert_method="auto",
                   agent_required=False, wait="") is None
    assert refusal(FULL, clones=True, revert_method="inplace", agent_required=True, wait="agent") is None
    no_clones = Capabilities(True, True, False, True, True, True, True)
    assert refusal(no_clones, clones=True, revert_method="auto", agent_required=False,
                   wait="") == "it cannot clone guests: drop --kvm-clones"


def provide_engine(pytester: pytest.Pytester, host: FakeHost) -> None:
    """A conftest that provides the fake engine over ``host`` (as ``fake://a``) through the hook."""
    fake_engine.PROVIDED = FakeKind(a=host)
    pytester.makeconftest("""
        from tests.unit import fake_engine

        def pytest_kvmsnap_engine(config):
            return fake_engine.PROVIDED
    """)


def test_a_plugin_provides_the_engine_and_pytest_runs_on_it(pytester: pytest.Pytester) -> None:
    """The whole plugin, through pytest, on the second engine a conftest provides
    (``pytest_kvmsnap_engine``): the marker, the fixture, the summary, the guest as found."""
    host = FakeHost()
    guest = host.add("g", state="clean")
    provide_engine(pytester, host)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm_snapshot("g")
        @pytest.mark.parametrize("i", range(3))
        def test_t(i, kvm_guest):
            disk = kvm_guest.domain.disk  # the engine's own object for the guest
            assert disk == {"state": "clean"}
            disk["state"] = f"changed by test {i}"
    """)
    result = pytester.runpytest("--kvm-uri=fake://a", "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*g: baseline kvmsnap-* taken in *, 3 revert(s)*"])
    assert guest.disk == {"state": "clean"} and guest.saved == {} and host.leases == {}
    assert [step.split()[0] for step in guest.log] == ["take", "hot", "hot", "hot", "delete"]


def test_the_commands_a_message_advises_come_from_the_engine(pytester: pytest.Pytester) -> None:
    """A kept failed state is looked at and deleted with the engine's own tool: no libvirt words
    reach a user of another engine (the fake one's tool is ``fakectl``)."""
    host = FakeHost()
    host.add("g", state="clean")
    provide_engine(pytester, host)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm_snapshot("g")
        def test_fails(kvm_guest):
            assert False
    """)
    result = pytester.runpytest("--kvm-uri=fake://a", "--kvm-keep-failed", "-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["  look:   fakectl fake://a revert g kept-test_fails-*",
                                 "  delete: fakectl fake://a delete g kept-test_fails-*",
                                 "*save it first to come back to it (fakectl save GUEST NAME)"])
    assert "virsh" not in result.stdout.str()


def test_a_workers_notices_reach_the_summary(pytester: pytest.Pytester) -> None:
    """xdist shows nothing a worker writes to stderr: its notices (here: a failed test's state
    kept for the user) come back with its results and are in the controller's summary."""
    pytester.makeconftest("""
        from tests.unit.fake_engine import FakeHost, FakeKind

        # Each process builds its own fake host: the worker's guest is not the controller's, so
        # the controller's restore finds the worker's lease gone (a line the test ignores).
        HOST = FakeHost()
        HOST.add("g", state="clean")

        def pytest_kvmsnap_engine(config):
            return FakeKind(a=HOST)
    """)
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kvm_snapshot("g")
        def test_fails(kvm_guest):
            assert False
    """)
    result = pytester.runpytest_subprocess("--kvm-uri=fake://a", "--kvm-keep-failed", "-p", "no:randomly",
                                           "-n", "1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["=* kvmsnap =*", "[[]gw0[]] kvmsnap: g: its state after *test_fails failed is kept "
                                 "as snapshot kept-test_fails-*"])
