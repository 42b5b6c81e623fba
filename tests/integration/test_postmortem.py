"""When a test fails on a real guest: its state kept, its console shown, a panic called out,
a screenshot saved, and the figures in JUnit XML -- also under xdist."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvmsnap.engine import kept_for_user
from pytest_kvmsnap.libvirt.machine import LibvirtMachine
from pytest_kvmsnap.libvirt.snapshots import LibvirtSnapshot
from pytest_kvmsnap.testing import Console, GuestImage, define_guest, remove_guest
from tests.integration.conftest import URI, RealGuest, _live, run_inner
from tests.integration.test_semantics import CLEAN, assert_as_found

PANIC = """
import pytest
from pytest_kvmsnap.testing.console import ConsoleError

@pytest.mark.kvm_snapshot("{name}")
def test_panics(sh):
    sh.check("echo 1 > /data/marker; echo 0 > /proc/sys/kernel/panic")  # hang on panic, as Debian does
    sh.run("echo c > /proc/sysrq-trigger", timeout=5)

@pytest.mark.kvm_snapshot("{name}")
def test_after_it(sh):
    assert sh.run("{clean}").status == 0
"""


def properties(junit: Path) -> dict[str, list[tuple[str, str]]]:
    root = ET.parse(junit).getroot()
    return {case.get("name", ""): [(p.get("name", ""), p.get("value", "")) for p in case.iter("property")]
            for case in root.iter("testcase")}


def kept_names(guest: RealGuest) -> list[str]:
    return [str(record["name"]) for record in kept_for_user(LibvirtMachine(guest.domain()))]


def delete_kept(guest: RealGuest) -> None:
    for snap in guest.domain().listAllSnapshots():
        if snap.getName().startswith("kept-"):
            snap.delete(0)


def test_a_panicking_guest_is_kept_called_out_and_reverted(inner: pytest.Pytester, guest_a: RealGuest) -> None:
    inner.makepyfile(PANIC.format(name=guest_a.name, clean=CLEAN))
    result = run_inner(inner, "--kvm-keep-failed", "--junitxml=junit.xml", "-rf", "-vv")  # -vv: untrimmed -r lines
    result.assert_outcomes(passed=1, failed=1)  # the next test found the guest reverted and clean
    result.stdout.fnmatch_lines([
        "*- kvmsnap: kvmsnap-it-a console during the test (KERNEL TROUBLE) -*",
        "*Kernel panic - not syncing: sysrq triggered crash*",
        f"kvmsnap: kept {guest_a.name}'s state after *::test_panics failed: snapshot kept-test_panics-*-1",
        f"FAILED *::test_panics - kvmsnap: guest '{guest_a.name}' kernel trouble: Kernel panic - not syncing: "
        "sysrq triggered crash | *",
    ])
    failure = ET.parse(inner.path / "junit.xml").getroot().find(".//testcase[@name='test_panics']/failure")
    assert failure is not None and "Kernel panic" in failure.get("message", "")
    props = properties(inner.path / "junit.xml")
    kept = kept_names(guest_a)
    assert ("kvmsnap_kept_snapshot", kept[0]) in props["test_panics"]
    # The kept state is the panicked guest itself: a revert to it brings back a guest whose
    # console no longer answers.
    snapshot = guest_a.domain().snapshotLookupByName(kept[0])
    assert LibvirtSnapshot(snapshot).state() == "running"  # memory was saved, not only disks
    delete_kept(guest_a)
    assert_as_found(guest_a)


KEPT_BEYOND_CAP = """
import pytest
@pytest.mark.kvm_snapshot("{name}")
@pytest.mark.parametrize("i", [1, 2, 3])
def test_fails(i, sh):
    assert sh.run("{clean}").status == 0, "the previous test's state leaked"
    sh.check(f"echo {{i}} > /data/marker; echo {{i}} > /tmp/marker")
    assert False, "the guest is now in the state to look at"
"""


def test_kept_states_up_to_the_cap_are_one_revert_away(inner: pytest.Pytester, guest_b: RealGuest) -> None:
    inner.makepyfile(KEPT_BEYOND_CAP.format(name=guest_b.name, clean=CLEAN))
    result = run_inner(inner, "--kvm-keep-failed", "--kvm-keep-failed-max=2")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([f"kvmsnap: not kept: {guest_b.name}'s state after *test_fails[[]3[]] failed "
                                 "(2 kept for this run already (kvm_keep_failed_max=2))"])
    kept = sorted(kept_names(guest_b))
    assert [name.rsplit("-", 1)[1] for name in kept] == ["1", "2"]
    assert guest_b.console.run(CLEAN).status == 0  # the run put the guest back as found
    # What the summary says to type: the kept state of test 2, memory and disk.
    look = next(line for line in result.stdout.lines if line.startswith("  look:") and kept[1] in line)
    assert look.split("look:")[1].split() == ["virsh", "-c", URI, "snapshot-revert", guest_b.name, kept[1]]
    guest_b.domain().revertToSnapshot(guest_b.domain().snapshotLookupByName(kept[1]), 0)
    assert guest_b.console.check("cat /tmp/marker /data/marker") == "2\n2"
    delete_kept(guest_b)  # the guest is now dirty: the next test's fixture redefines it


@pytest.fixture
def screen_guest(image: GuestImage, libvirt_conn) -> Iterator[RealGuest]:  # type: ignore[no-untyped-def]
    name = "kvmsnap-it-screen"
    define_guest(_live(libvirt_conn), name, image, screen=True)
    guest = RealGuest(name, Console(str(image.console_for(name))), image)
    guest.console.wait_ready()
    yield guest
    remove_guest(_live(libvirt_conn), name, image)


def test_a_failed_tests_screen_and_console_are_saved_beside_the_junit_file(
        inner: pytest.Pytester, screen_guest: RealGuest) -> None:
    inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{screen_guest.name}")
        def test_fails(sh):
            sh.check("echo something the tester wants to see")
            assert False
    """)
    result = run_inner(inner, "--junitxml=reports/junit.xml")
    result.assert_outcomes(failed=1)
    directory = inner.path / "reports" / "kvmsnap-artifacts"
    files = sorted(path.name for path in directory.iterdir())
    stem = f"test_a_failed_tests_screen_and_console_are_saved_beside_the_junit_file.py_test_fails-{screen_guest.name}"
    assert files == [f"{stem}.console.log", f"{stem}.png"]
    assert (directory / f"{stem}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "something the tester wants to see" in (directory / f"{stem}.console.log").read_text()
    result.stdout.fnmatch_lines([f"kvmsnap: 2 evidence file(s) of failed tests in {directory}"])
    artifacts = [value for name, value in properties(inner.path / "reports" / "junit.xml")["test_fails"]
                 if name == "kvmsnap_artifact"]
    assert sorted(Path(path).name for path in artifacts) == files
    assert_as_found(screen_guest)


def test_figures_and_kept_states_are_right_under_xdist(inner: pytest.Pytester, guest_a: RealGuest,
                                                      guest_b: RealGuest) -> None:
    inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest_a.name}")
        @pytest.mark.parametrize("fail", [False, True])
        def test_a(fail, sh):
            sh.check("echo a > /tmp/marker")
            assert not fail
        @pytest.mark.kvm_snapshot("{guest_b.name}")
        @pytest.mark.parametrize("fail", [False, True])
        def test_b(fail, sh):
            sh.check("echo b > /tmp/marker")
            assert not fail
    """)
    result = run_inner(inner, "-n", "2", "--kvm-keep-failed", "--junitxml=junit.xml")
    result.assert_outcomes(passed=2, failed=2)
    props = properties(inner.path / "junit.xml")
    for test, guest in (("test_a", guest_a), ("test_b", guest_b)):
        for fail in (False, True):
            found = dict(props[f"{test}[{fail}]"])
            assert found["kvmsnap_guest"] == guest.name
            assert found["kvmsnap_revert_method"] == "inplace"
            assert float(found["kvmsnap_revert_seconds"]) > 0
            assert ("kvmsnap_kept_snapshot" in found) == fail
        assert kept_names(guest) == [dict(props[f"{test}[True]"])["kvmsnap_kept_snapshot"]]
        delete_kept(guest)
        assert_as_found(guest)
    # -v lists the slowest reverts and waits, as --durations lists tests.
    result = run_inner(inner, "-n", "2")
    result.stdout.fnmatch_lines(["kvmsnap: slowest * reverts and waits", "*s revert (inplace)*kvmsnap-it-*::test_*"])
    for guest in (guest_a, guest_b):
        assert_as_found(guest)
