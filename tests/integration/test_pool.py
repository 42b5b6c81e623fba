"""A pool of hypervisors (``--kvm-uri`` given twice): the test guest on the system libvirtd
and a guest of the same name on a second, real libvirtd reached over SSH (an unprivileged
user's session daemon, ``scripts/setup-ssh-hypervisor.sh``).  ``scripts/test.sh`` sets
``KVMSNAP_POOL_URI`` and ``KVMSNAP_POOL_GUEST_DIR`` for it."""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_kvmsnap.testing import Console, build_image, define_guest, remove_guest
from tests.integration.conftest import URI, RealGuest, run_inner
from tests.integration.test_parallel import exclusive_tests
from tests.integration.test_semantics import assert_as_found

POOL_URI = os.environ.get("KVMSNAP_POOL_URI", "")
POOL_DIR = os.environ.get("KVMSNAP_POOL_GUEST_DIR", "")
UNREACHABLE = "qemu+tcp://127.0.0.1:1/system"  # nothing listens on port 1: refused at once

pytestmark = pytest.mark.skipif(not POOL_URI or not POOL_DIR or POOL_URI == URI,
                                reason="needs a second hypervisor: run scripts/test.sh, which sets it up")

# The inner runs' console fixture: the guest's console socket is in its own host's guest directory.
POOL_CONFTEST = textwrap.dedent("""
    import os, pytest
    from pathlib import Path
    from pytest_kvmsnap.testing import Console
    from pytest_kvmsnap.testing.guest import guest_dir

    @pytest.fixture
    def sh(kvm_guest):
        pooled = kvm_guest.uri == os.environ["KVMSNAP_POOL_URI"]
        directory = Path(os.environ["KVMSNAP_POOL_GUEST_DIR"]) if pooled else guest_dir()
        console = Console(str(directory / "sock" / f"{kvm_guest.name}.sock"))
        console.wait_ready()
        with open(f"served-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", "a") as out:
            out.write(kvm_guest.uri + "\\n")
        return console
""")


@pytest.fixture
def pool_guest(guest_a: RealGuest) -> Iterator[RealGuest]:
    """A guest named like ``guest_a`` on the second hypervisor, from its own copy of the image."""
    import libvirt

    conn = libvirt.open(POOL_URI)
    image = build_image(Path(POOL_DIR))
    define_guest(conn, guest_a.name, image)
    guest = RealGuest(guest_a.name, Console(str(image.console_for(guest_a.name))), image, uri=POOL_URI)
    guest.console.wait_ready()
    yield guest
    remove_guest(conn, guest_a.name, image)
    guest.drop_lease()
    conn.close()


@pytest.fixture
def pool_inner(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    inner.makeconftest(POOL_CONFTEST)  # after ``inner`` wrote its own (``spawn`` uses that fixture too)
    monkeypatch.setenv("KVMSNAP_POOL_URI", POOL_URI)
    return inner


def served(inner: pytest.Pytester) -> dict[str, set[str]]:
    """Which hosts each process's tests ran on."""
    return {path.name.removeprefix("served-"): set(path.read_text().split())
            for path in inner.path.glob("served-*")}


def test_workers_spread_over_the_pool_and_the_summary_names_each_host(
        pool_inner: pytest.Pytester, guest_a: RealGuest, pool_guest: RealGuest) -> None:
    pool_inner.makepyfile(exclusive_tests(guest_a.name, n=6, pause=0.5))
    result = run_inner(pool_inner, f"--kvm-uri={POOL_URI}", "-n", "2")
    result.assert_outcomes(passed=6)
    assert served(pool_inner) == {"gw0": {URI}, "gw1": {POOL_URI}}
    result.stdout.fnmatch_lines_random([f"{guest_a.name} at {URI} (served gw0): baseline kvmsnap-*",
                                        f"{guest_a.name} at {POOL_URI} (served gw1): baseline kvmsnap-*"])
    assert_as_found(guest_a)
    assert_as_found(pool_guest)


def test_a_host_that_cannot_be_reached_is_skipped_with_one_line(
        pool_inner: pytest.Pytester, guest_a: RealGuest, pool_guest: RealGuest) -> None:
    pool_inner.makepyfile(exclusive_tests(guest_a.name, n=2, pause=0.1))
    result = pool_inner.runpytest_subprocess(f"--kvm-uri={UNREACHABLE}", f"--kvm-uri={POOL_URI}",
                                             "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    # One line when it happens, repeated in the summary like every incident of the run.
    summary = next(index for index, line in enumerate(result.outlines) if " kvmsnap " in line)
    for part in (result.outlines[:summary], result.outlines[summary:]):
        lines = [line for line in part if UNREACHABLE in line]
        assert len(lines) == 1 and lines[0].startswith(
            f"kvmsnap: guest '{guest_a.name}': skipping {UNREACHABLE}: it cannot be reached ("), result.outlines
    assert served(pool_inner) == {"main": {POOL_URI}}
    assert_as_found(pool_guest)


@pytest.fixture
def silent_uri() -> Iterator[str]:
    """A hypervisor host that takes the TCP connection and never answers (a hung daemon, or a
    host gone behind a proxy): TCP alone would wait for ever."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"qemu+tcp://127.0.0.1:{server.getsockname()[1]}/system"


def test_a_host_that_never_answers_is_skipped_after_the_connect_timeout(
        pool_inner: pytest.Pytester, guest_a: RealGuest, pool_guest: RealGuest, silent_uri: str) -> None:
    pool_inner.makepyfile(exclusive_tests(guest_a.name, n=2, pause=0.1))
    result = pool_inner.runpytest_subprocess(f"--kvm-uri={silent_uri}", f"--kvm-uri={POOL_URI}",
                                             "--kvm-connect-timeout=2", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"kvmsnap: guest '{guest_a.name}': skipping {silent_uri}: it cannot be reached "
                                 f"(the hypervisor at {silent_uri} did not answer within 2 s*--kvm-connect-timeout)"])
    assert served(pool_inner) == {"main": {POOL_URI}}
    assert_as_found(pool_guest)


def test_a_host_whose_guest_another_run_holds_is_passed_over(
        pool_inner: pytest.Pytester, guest_a: RealGuest, pool_guest: RealGuest, spawn: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another host's run holds the guest on the first hypervisor: this run uses the second at once."""
    pool_inner.makepyfile(test_holder=f"""
        import os, time, pytest
        @pytest.mark.kvm_snapshot("{guest_a.name}")
        def test_hold(sh):
            open("holding", "w").close()
            while not os.path.exists("release"):
                time.sleep(0.1)
    """)
    monkeypatch.setenv("KVMSNAP_HOST_ID", "other-runner")
    holder = spawn("holder", f"--kvm-lock-dir={tmp_path / 'other'}")
    deadline = time.monotonic() + 120
    while not (pool_inner.path / "holding").exists():
        assert time.monotonic() < deadline and holder.poll() is None, (pool_inner.path / "holder.out").read_text()
        time.sleep(0.1)
    monkeypatch.delenv("KVMSNAP_HOST_ID")
    (pool_inner.path / "test_holder.py").unlink()
    (pool_inner.path / "served-main").unlink()  # the holder's
    pool_inner.makepyfile(exclusive_tests(guest_a.name, n=2, pause=0.1))
    try:
        result = run_inner(pool_inner, f"--kvm-uri={POOL_URI}")
    finally:
        (pool_inner.path / "release").touch()
    result.assert_outcomes(passed=2)
    assert "waiting" not in result.stdout.str()
    assert served(pool_inner)["main"] == {POOL_URI}
    assert holder.wait(120) == 0, (pool_inner.path / "holder.out").read_text()
    assert_as_found(guest_a)
    assert_as_found(pool_guest)


def test_clones_are_made_on_the_host_each_worker_was_given(
        pool_inner: pytest.Pytester, guest_a: RealGuest, pool_guest: RealGuest) -> None:
    pool_inner.makepyfile(exclusive_tests(guest_a.name, n=4, pause=0.1))
    result = run_inner(pool_inner, f"--kvm-uri={POOL_URI}", "-n", "2", "--kvm-clones=auto")
    result.assert_outcomes(passed=4)
    assert served(pool_inner) == {"gw0": {URI}, "gw1": {POOL_URI}}
    result.stdout.fnmatch_lines_random([
        f"{guest_a.name} at {URI}: not used by tests; its disks *copied for the clones*",
        f"{guest_a.name} at {POOL_URI}: not used by tests; its disks *copied for the clones*",
        f"{guest_a.name}-kvmsnap-*-0 at {URI} (served gw0): baseline *",
        f"{guest_a.name}-kvmsnap-*-1 at {POOL_URI} (served gw1): baseline *"])
    for guest in (guest_a, pool_guest):
        assert_as_found(guest)
        import libvirt

        conn = libvirt.open(guest.uri)
        assert [d.name() for d in conn.listAllDomains() if "-kvmsnap-" in d.name()] == []
        assert [p.name() for p in conn.listAllStoragePools() if "-kvmsnap-" in p.name()] == []
