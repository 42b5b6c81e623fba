"""When a test fails: kept states, console evidence, JUnit properties (on the test driver).

tests/integration/test_postmortem.py proves the same on a real QEMU guest,
with a kernel panic, a screenshot and a cap reached.
"""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from pytest_kvmsnap import postmortem
from pytest_kvmsnap.engine import kept_for_user
from pytest_kvmsnap.figures import GuestFigures, from_properties, slow_entries
from pytest_kvmsnap.libvirt.machine import LibvirtMachine
from tests.conftest import TestDriver
from tests.unit.helpers import run_unit as run
from tests.unit.helpers import three_tests

HMP_SAFE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


@pytest.fixture
def guest(testdriver: TestDriver) -> str:
    return testdriver.define()


def kept(testdriver: TestDriver, name: str) -> list[dict[str, object]]:
    return sorted(kept_for_user(LibvirtMachine(testdriver.conn.lookupByName(name))), key=lambda r: str(r["name"]))


def test_a_failed_tests_state_is_kept_for_the_user_and_survives_cleanup(pytester, guest, testdriver) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(three_tests(guest, fail_at="2"))
    result = run(pytester, "--kvm-keep-failed")
    result.assert_outcomes(passed=2, failed=1)
    records = kept(testdriver, guest)
    assert [(r["test"], r["guest"]) for r in records] == [
        ("test_a_failed_tests_state_is_kept_for_the_user_and_survives_cleanup.py::test_t[2]", guest)]
    name = str(records[0]["name"])
    assert HMP_SAFE.match(name) and name.startswith("kept-test_t_2-")
    assert testdriver.snapshots(guest) == [name]  # the run's own baseline is gone, the kept one stays
    result.stdout.fnmatch_lines([f"kvmsnap: kept {guest}'s state after *test_t[[]2[]] failed: snapshot {name}",
                                 f"  look:   virsh -c test:///default snapshot-revert {guest} {name}",
                                 f"  delete: virsh -c test:///default snapshot-delete {guest} {name}"])
    # Neither the next run's recovery nor --kvm-cleanup touches it.
    pytester.makepyfile(three_tests(guest))
    run(pytester).assert_outcomes(passed=3)
    assert run(pytester, "--kvm-cleanup", f"--kvm-domain={guest}").ret == 0
    assert testdriver.snapshots(guest) == [name]


def test_past_the_cap_one_line_names_each_failure_not_kept(pytester, guest, testdriver) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest}")
        @pytest.mark.parametrize("i", [1, 2, 3, 4])
        def test_f(i, kvm_guest):
            assert False
    """)
    result = run(pytester, "--kvm-keep-failed", "--kvm-keep-failed-max=2")
    result.assert_outcomes(failed=4)
    assert [r["test"] for r in kept(testdriver, guest)] == [f"test_past_the_cap_one_line_names_each_failure_not_kept"
                                                            f".py::test_f[{i}]" for i in (1, 2)]
    for i in (3, 4):
        result.stdout.fnmatch_lines([f"kvmsnap: not kept: {guest}'s state after *test_f[[]{i}[]] failed "
                                     "(2 kept for this run already (kvm_keep_failed_max=2))"])


def test_without_the_option_nothing_is_kept(pytester, guest, testdriver) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(three_tests(guest, fail_at="1"))
    run(pytester).assert_outcomes(passed=2, failed=1)
    assert testdriver.snapshots(guest) == []


def test_junit_xml_has_each_tests_guest_figures(pytester, guest) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(three_tests(guest, fail_at="3"))
    run(pytester, "--junitxml=out/junit.xml", "--kvm-keep-failed").assert_outcomes(passed=2, failed=1)
    root = ET.parse(pytester.path / "out" / "junit.xml").getroot()
    for case in root.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert props["kvmsnap_guest"] == guest
        assert props["kvmsnap_revert_method"] == "restart"  # the test driver has no QEMU monitor
        assert float(str(props["kvmsnap_revert_seconds"])) >= 0
        assert float(str(props["kvmsnap_wait_seconds"])) >= float(str(props["kvmsnap_lock_wait_seconds"]))
        assert ("kvmsnap_kept_snapshot" in props) == case.get("name", "").endswith("[3]")


def test_find_trouble_names_the_most_serious_line() -> None:
    console = ("[   1.0] ok\n[  12.3] INFO: task kworker:1 blocked for more than 120 seconds.\n"
               "[  13.0] Kernel panic - not syncing: sysrq triggered crash\n")
    assert postmortem.find_trouble(console) == "Kernel panic - not syncing: sysrq triggered crash"
    assert postmortem.find_trouble("BUG: kernel NULL pointer dereference, address: 0") is not None
    assert postmortem.find_trouble("test BUG: in my program\nall fine") is None


@pytest.mark.parametrize("nodeid", ["t.py::test_x", "t.py::test_x[a b'\"; rm -rf /]", "t.py::" + "é" * 300, "::"])
def test_kept_names_are_safe_for_qemus_monitor(nodeid: str) -> None:
    name = postmortem.kept_name(nodeid, "0123456789ab", 12)
    assert HMP_SAFE.match(name), name
    assert name.endswith("-0123456789ab-12")


def test_console_since_the_test_started(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("boot\nbefore the test\n")
    mark = postmortem.ConsoleMark(str(log), log.stat().st_size)
    with log.open("a") as f:
        f.write("".join(f"line {i}\r\n" for i in range(10)) + "Kernel panic - not syncing: Fatal exception\n")
    tail = postmortem.console_since("g", mark, lines=3)
    assert tail.lines == ("line 8", "line 9", "Kernel panic - not syncing: Fatal exception")
    assert tail.total == 11 and tail.trouble == "Kernel panic - not syncing: Fatal exception"
    assert tail.text().startswith("(last 3 of 11 lines)")
    log.write_text("restarted\n")  # a libvirt revert restarted QEMU, which truncated the log
    assert postmortem.console_since("g", mark, lines=3).lines == ("restarted",)


def test_png_from_ppm_keeps_the_pixels() -> None:
    pixels = bytes(range(2 * 3 * 3))
    png = postmortem.png_from_ppm(b"P6\n# QEMU\n2 3\n255\n" + pixels)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    idat = png.index(b"IDAT")
    (length,) = struct.unpack(">I", png[idat - 4:idat])
    rows = zlib.decompress(png[idat + 4:idat + 4 + length])
    assert (width, height) == (2, 3)
    assert rows == b"".join(b"\0" + pixels[y * 6:(y + 1) * 6] for y in range(3))


def test_figures_survive_the_trip_through_properties() -> None:
    figures = [GuestFigures("a", 0.25, ["inplace"], 1.5, 0.5, kept_snapshot="kept-x", kept_uri="qemu+ssh://h/system"),
               GuestFigures("b", 3.0, ["restart", "inplace"], not_kept="cap")]
    back = from_properties([("other", 1), *(p for f in figures for p in f.properties())])
    assert back == figures
    assert [(s.what, s.guest) for s in sorted(slow_entries("t", back), reverse=True)] == [
        ("revert (restart,inplace)", "b"), ("lock wait", "a"), ("ready", "a"), ("revert (inplace)", "a")]


def test_a_kept_clones_commands_are_virsh_only_and_quoted() -> None:
    """A kept clone is deleted through libvirt (the hypervisor may be another host), names quoted."""
    import shlex

    from pytest_kvmsnap.libvirt.advice import VirshAdvice
    from pytest_kvmsnap.postmortem import Kept

    kept = Kept("web-kept-r1-0", "t.py::test_x", "kept-test_x-r1-1", pool="web-kvmsnap-r1-0")
    look, delete = kept.commands(VirshAdvice(), "qemu+ssh://u@h/session?keyfile=/k")
    assert shlex.split(look) == ["virsh", "-c", "qemu+ssh://u@h/session?keyfile=/k", "snapshot-revert",
                                 "web-kept-r1-0", "kept-test_x-r1-1"]
    steps = [shlex.split(step) for step in delete.split(" && ")]
    assert [step[3] for step in steps] == ["undefine", "pool-destroy", "pool-delete", "pool-undefine"]
    assert steps[0][4:] == ["web-kept-r1-0", "--snapshots-metadata", "--remove-all-storage"]
    assert {step[4] for step in steps[1:]} == {"web-kvmsnap-r1-0"}
