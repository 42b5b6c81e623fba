"""Bad input: one clear message that says what to do, and nothing changed."""

from __future__ import annotations

import pytest

from pytest_kvmsnap.exceptions import ConfigError
from tests.conftest import TestDriver


def run_one(pytester: pytest.Pytester, marker: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot({marker})
        def test_one(kvm_guest):
            pass
    """)
    return pytester.runpytest("--kvm-uri=test:///default", *args)


def test_unknown_domain_lists_domains(pytester: pytest.Pytester, testdriver: TestDriver) -> None:
    name = testdriver.define()
    result = run_one(pytester, "'nope'")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*no domain named 'nope' at test:///default. Domains there: *{name}*"])
    assert "Traceback" not in result.stdout.str()


def test_unknown_snapshot_lists_snapshots(pytester: pytest.Pytester, testdriver: TestDriver) -> None:
    name = testdriver.define()
    testdriver.conn.lookupByName(name).snapshotCreateXML("<domainsnapshot><name>mine</name></domainsnapshot>")
    result = run_one(pytester, f"'{name}', snapshot='missing'")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*{name}* has no snapshot named 'missing'. Its snapshots: mine*"])
    assert testdriver.snapshots(name) == ["mine"]


def test_raw_disk_is_refused_before_any_snapshot(pytester: pytest.Pytester, testdriver: TestDriver) -> None:
    name = testdriver.define(disk_format="raw")
    result = run_one(pytester, f"'{name}'")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*disk vda is raw, and internal snapshots need qcow2. Convert it*"])
    assert testdriver.snapshots(name) == []


def test_pflash_guest_is_refused_on_old_libvirt(pytester: pytest.Pytester, testdriver: TestDriver) -> None:
    name = testdriver.define(pflash=True)
    result = run_one(pytester, f"'{name}'")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*boots UEFI from pflash*"])


@pytest.mark.parametrize(("device", "message"), [
    ("<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='1' slot='0' "
     "function='0'/></source></hostdev>", "a passed-through host device (<hostdev type='pci'>)"),
    ("<filesystem type='mount'><driver type='virtiofs'/><source dir='/srv'/><target dir='srv'/></filesystem>",
     "a virtiofs filesystem*"),
    ("<shmem name='ivshmem0'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>",
     "shared memory 'ivshmem0' without <role>master</role>"),
])
def test_savevm_blocking_device_is_refused(pytester: pytest.Pytester, testdriver: TestDriver,
                                           device: str, message: str) -> None:
    name = testdriver.define(extra=device)
    result = run_one(pytester, f"'{name}'")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*guest '{name}' has {message}, which QEMU cannot save into a snapshot*"])
    assert testdriver.snapshots(name) == []


@pytest.mark.parametrize("uri", ["qemu+unix:///system?socket=/nonexistent/libvirt-sock"])
def test_unreachable_uri_says_daemon_down(pytester: pytest.Pytester, uri: str) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.kvm_snapshot("g")
        def test_one(): pass
        @pytest.mark.kvm_snapshot("g")
        def test_two(): pass
    """)
    result = pytester.runpytest(f"--kvm-uri={uri}")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*cannot open libvirt connection*libvirtd does not seem to be running*"])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize("name", ["we<ird & 'name'", "semi;colon $(rm -rf x) ünïcode"])
def test_special_names_are_data(pytester: pytest.Pytester, testdriver: TestDriver, name: str) -> None:
    testdriver.define(name)
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot({name!r})
        def test_one(kvm_guest):
            assert kvm_guest.name == {name!r}
    """)
    pytester.runpytest("--kvm-uri=test:///default").assert_outcomes(passed=1)
    assert testdriver.snapshots(name) == []


def test_strict_inplace_is_refused_where_the_engine_has_no_hot_revert(pytester: pytest.Pytester,
                                                                     testdriver: TestDriver) -> None:
    """inplace promises no cold revert between tests: an engine without in-place reverts (libvirt's
    test driver has no QEMU monitor) is refused before the guest is touched."""
    name = testdriver.define()
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot({name!r}, revert="before")
        @pytest.mark.parametrize("i", [1, 2])
        def test_one(i, kvm_guest):
            pass
    """)
    result = pytester.runpytest("--kvm-uri=test:///default", "--kvm-revert-method=inplace")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*the hypervisor at test:///default cannot serve this run: it has no in-place "
                                 "revert: use --kvm-revert-method=auto*"])
    assert testdriver.snapshots(name) == []


@pytest.mark.parametrize(("uri", "said", "hint"), [
    ("qemu+unix:///system?socket=/x", "Failed to connect socket to '/x': No such file or directory",
     "libvirtd does not seem to be running: start it (systemctl start libvirtd"),
    ("qemu+tcp://hv2.example/system", "unable to connect to server at 'hv2.example:16509': Connection refused",
     "the hypervisor host hv2.example cannot be reached, or its libvirtd does not listen: check that host"),
    ("qemu+ssh://ci@hv3/system", "Cannot recv data: ssh: connect to host hv3 port 22: Connection timed out",
     "the hypervisor host hv3 cannot be reached"),
    ("qemu+ssh://ci@hv3/system", "Cannot recv data: ci@hv3: Permission denied (publickey).",
     "SSH to hv3 refused: check the user in the URI, its key (?keyfile=...)"),
    ("qemu:///system", "authentication unavailable: no polkit agent available",
     "permission was denied: run as root"),
])
def test_a_connection_failure_blames_the_host_it_happened_on(uri: str, said: str, hint: str) -> None:
    """A local daemon's advice (systemctl start libvirtd) is never given for another host's."""
    from pytest_kvmsnap.libvirt.connection import connection_failed

    message = str(connection_failed(uri, said))
    assert message.startswith(f"cannot open libvirt connection {uri!r}: {hint}"), message
    assert said in message


def test_a_hypervisor_that_never_answers_errors_the_test_after_the_connect_timeout(
        pytester: pytest.Pytester) -> None:
    """A host that takes the connection and never answers (hung, or gone behind a proxy): the
    real libvirt client would wait for ever; the test errors after --kvm-connect-timeout."""
    import socket

    pytester.makepyfile("""
        import pytest
        @pytest.mark.kvm_snapshot("web")
        def test_x(kvm_guest):
            pass
    """)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        uri = f"qemu+tcp://127.0.0.1:{server.getsockname()[1]}/system"
        result = pytester.runpytest_subprocess(f"--kvm-uri={uri}", "--kvm-connect-timeout=1.5", timeout=120)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*the hypervisor at {uri} did not answer within 1.5 s (a host that is down, *"
                                 "check that host, or raise --kvm-connect-timeout*"])


def test_the_connect_timeout_is_seconds(pytester: pytest.Pytester) -> None:
    from pytest_kvmsnap.config import resolve

    assert resolve(pytester.parseconfig(), env={}).connect_timeout == 20
    assert resolve(pytester.parseconfig("--kvm-connect-timeout=3.5"), env={}).connect_timeout == 3.5
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="kvm_connect_timeout"):
            resolve(pytester.parseconfig(f"--kvm-connect-timeout={bad}"), env={})


def test_a_second_interrupt_during_the_restore_is_one_line(pytester: pytest.Pytester,
                                                           testdriver: TestDriver) -> None:
    """Ctrl-C while the run's end restores the guest: leave at once, say what is left and the fix."""
    name = testdriver.define()
    pytester.makeconftest("""
        def pytest_kvmsnap_before_revert(config, domain, snapshot, reason):
            if reason == "end of session":
                raise KeyboardInterrupt  # what a second Ctrl-C raises there
    """)
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot('{name}', revert="never")
        def test_one(kvm_guest):
            pass
    """)
    result = pytester.runpytest("--kvm-uri=test:///default")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stderr.fnmatch_lines([f"kvmsnap: interrupted while restoring the guests; left unrestored: {name}. "
                                 "Run `pytest --kvm-cleanup` (with this run's --kvm-uri) to restore them now*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
