"""A real distribution over SSH: Debian 12 with systemd, sshd and the guest agent.

What an in-place revert does to a running system -- stale TCP connections, a
clock from the snapshot's moment, a replayed random generator, services not
answering yet -- and what the plugin does about each, checked from outside
through the guest agent.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvmsnap.testing.debian import build_debian, define_debian, wait_until_settled
from pytest_kvmsnap.testing.guest import remove_guest
from tests.integration.conftest import SSH_CONFTEST, DebianGuest, _live_open, run_inner

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ssh_inner(inner: pytest.Pytester, debian: DebianGuest) -> pytest.Pytester:
    inner.makeconftest(SSH_CONFTEST.format(key=debian.image.ssh_key))
    return inner


@pytest.mark.parametrize("wait", ["ssh", "tcp:22"])
def test_each_test_connects_at_once_and_finds_the_baseline(ssh_inner: pytest.Pytester, debian: DebianGuest,
                                                           wait: str) -> None:
    """--kvm-wait=ssh or tcp:22: every test's first connection succeeds, with no retry loop of its own."""
    ssh_inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{debian.name}")
        @pytest.mark.parametrize("i", [1, 2, 3])
        def test_each(i, ssh, kvm_guest):
            assert ssh("test -e /root/marker && echo dirty || echo clean") == "clean"
            ssh("echo {{i}} > /root/marker; systemctl stop ssh.socket ssh")  # even sshd goes down
            assert kvm_guest.generation == i - 1
    """)
    result = run_inner(ssh_inner, f"--kvm-wait={wait}")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"{debian.name}: baseline kvmsnap-* 3 revert(s)*; ready after 3 of them in "
                                 f"median * s ({wait}, clock, reseed)"])
    debian.assert_as_found()


def test_wait_for_the_agent(inner: pytest.Pytester, debian: DebianGuest) -> None:
    """--kvm-wait=agent: the agent answers each test's first command at once."""
    inner.makepyfile(f"""
        import json, libvirt_qemu, pytest
        @pytest.mark.kvm_snapshot("{debian.name}")
        @pytest.mark.parametrize("i", [1, 2, 3])
        def test_agent_answers(i, kvm_guest):
            ping = json.dumps({{"execute": "guest-ping"}})
            libvirt_qemu.qemuAgentCommand(kvm_guest.domain, ping, 1, 0)  # 1 s: no retry loop of its own
    """)
    result = run_inner(inner, "--kvm-wait=agent")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"{debian.name}: *; ready after 3 of them in median * s (agent, clock, reseed)"])
    debian.assert_as_found()


CLOCK_TESTS = """
    import json, time, pytest
    pytestmark = pytest.mark.kvm_snapshot("{name}")
    def test_1_thirty_seconds(ssh):
        time.sleep(30)
    def test_2_guest_clock(ssh):
        offset = time.time() - float(ssh("date +%s.%N"))
        open("offset.json", "w").write(json.dumps(offset))
"""


def test_clock_is_synced_after_a_revert(ssh_inner: pytest.Pytester, debian: DebianGuest) -> None:
    """30 s between two tests: synced, the guest is within 1 s of the host; not synced, ~30 s behind."""
    ssh_inner.makepyfile(CLOCK_TESTS.format(name=debian.name))
    offsets = {}
    for sync in ("auto", "off"):
        run_inner(ssh_inner, "--kvm-wait=ssh", f"--kvm-sync-clock={sync}").assert_outcomes(passed=2)
        offsets[sync] = float((ssh_inner.path / "offset.json").read_text())
    print(f"guest clock behind the host after a revert: synced {offsets['auto']:.3f} s, "
          f"not synced {offsets['off']:.3f} s")
    assert abs(offsets["auto"]) < 1.0
    assert 25.0 < offsets["off"] < 60.0
    debian.assert_as_found()


RANDOM_TESTS = """
    import pytest
    pytestmark = pytest.mark.kvm_snapshot("{name}")
    @pytest.mark.parametrize("i", [1, 2, 3])
    def test_read_random(i, ssh):
        open(f"random-{{i}}", "w").write(ssh("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '"))
"""


def test_entropy_is_reseeded_after_a_revert(ssh_inner: pytest.Pytester, debian: DebianGuest) -> None:
    """After two reverts the first bytes from /dev/urandom differ with --kvm-reseed; shown without."""
    ssh_inner.makepyfile(RANDOM_TESTS.format(name=debian.name))
    seen = {}
    for reseed in ("on", "off"):
        result = run_inner(ssh_inner, "--kvm-wait=ssh", f"--kvm-reseed={reseed}")
        result.assert_outcomes(passed=3)
        seen[reseed] = [(ssh_inner.path / f"random-{i}").read_text() for i in (2, 3)]  # after revert 1 and 2
        if reseed == "on":
            assert "reseed" in result.stdout.str() and "kvmsnap: kvmsnap-it-debian: reseed:" not in result.stdout.str()
    print(f"first urandom bytes after revert 1 and 2: reseeded {seen['on']}, not reseeded {seen['off']}")
    assert seen["on"][0] != seen["on"][1]
    debian.assert_as_found()


NAIVE_CACHE = """
    import pytest
    from conftest import connect, run
    pytestmark = pytest.mark.kvm_snapshot("{name}")
    CACHE = {{}}  # one client for the module, as users write it

    @pytest.mark.parametrize("i", [1, 2, 3])
    def test_cached_client(i, kvm_guest):
        if "client" not in CACHE:
            CACHE["client"] = connect(kvm_guest)
        assert run(CACHE["client"], "echo $((40 + 2))") == "42"
"""


def test_a_client_cached_across_reverts(inner: pytest.Pytester, debian: DebianGuest) -> None:
    """What users hit with a client of their own cached across reverts, then examples/ssh (kvm_ssh)
    on the same guest."""
    inner.makeconftest(SSH_CONFTEST.format(key=debian.image.ssh_key))
    inner.makepyfile(NAIVE_CACHE.format(name=debian.name))
    naive = run_inner(inner, "--kvm-wait=ssh")
    naive.assert_outcomes(passed=1, failed=2)  # the revert after test 1 killed the cached connection
    # The stale connection fails as EOFError or "SSH session not active", depending on when
    # paramiko's transport thread noticed the reset (a loaded host notices first): either.
    failures = naive.stdout.str().split("_ test_cached_client[")[1:]
    assert len(failures) == 2, naive.stdout.str()
    for failure in failures:
        assert "EOFError" in failure or "SSHException: SSH session not active" in failure, failure
    debian.assert_as_found()
    example = inner.path / "example"
    shutil.copytree(REPO / "examples" / "ssh", example)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-v", str(example),
                                        f"--kvm-domain={debian.name}", "--kvm-wait=ssh",
                                        f"--kvm-ssh-key={debian.image.ssh_key}", f"--kvm-uri={_uri()}")
    result.assert_outcomes(passed=6)
    debian.assert_as_found()


def _uri() -> str:
    from tests.integration.conftest import URI

    return URI


def test_a_guest_that_never_comes_ready_errors_with_what_was_awaited(ssh_inner: pytest.Pytester,
                                                                   debian: DebianGuest) -> None:
    ssh_inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{debian.name}")
        def test_nothing_listens_there():
            raise AssertionError("must not run")
    """)
    result = run_inner(ssh_inner, "--kvm-wait=tcp:2999", "--kvm-wait-timeout=3")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*guest '{debian.name}' was not ready within 3 s after the revert: waited for "
                                 "a TCP connection on 127.0.0.1:* (guest port 2999) (--kvm-wait=tcp:2999)*"])
    assert "must not run" not in result.stdout.str()
    debian.assert_as_found()


def test_hooks_see_every_revert(ssh_inner: pytest.Pytester, debian: DebianGuest) -> None:
    """before_revert / after_revert bracket each revert; after_revert comes once the guest is ready."""
    ssh_inner.makeconftest(SSH_CONFTEST.format(key=debian.image.ssh_key) + """
def pytest_kvmsnap_before_revert(config, domain, snapshot, reason):
    open("hooks.log", "a").write(f"before {reason.split()[0]}\\n")

def pytest_kvmsnap_after_revert(config, domain, generation, seconds, steps):
    open("hooks.log", "a").write(f"after {generation} {'+'.join(steps)}\\n")
""")
    ssh_inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{debian.name}")
        @pytest.mark.parametrize("i", [1, 2])
        def test_t(i, ssh):
            pass
    """)
    run_inner(ssh_inner, "--kvm-wait=ssh").assert_outcomes(passed=2)
    assert (ssh_inner.path / "hooks.log").read_text().splitlines() == [
        "after 0 ssh", "before after", "after 1 clock+reseed+ssh", "before after"]
    debian.assert_as_found()


CLONE_ADDRESSES = """
    import json, os, time, pytest
    @pytest.mark.kvm_snapshot("{name}")
    @pytest.mark.parametrize("i", range(6))
    def test_where(i, kvm_guest, ssh):
        assert ssh("test -e /root/marker && echo dirty || echo clean") == "clean"
        ssh(f"echo {{i}} > /root/marker")
        time.sleep(1)  # both workers' clones are in use at once
        assert ssh("cat /root/marker") == str(i)
        with open(f"where-{{i}}.json", "w") as f:
            json.dump([kvm_guest.name, kvm_guest.address(22)[1]], f)
"""


KVM_SSH_SHELL = """
    @pytest.fixture
    def ssh(kvm_ssh):
        return lambda command: kvm_ssh.run(command).stdout
"""


@pytest.mark.parametrize("client", ["own", "kvm_ssh"])
def test_clones_each_get_their_own_forwarded_port(ssh_inner: pytest.Pytester, debian: DebianGuest,
                                                  client: str) -> None:
    """Two workers, two clones of one memory image: each its own QEMU, so its own host port; with
    kvm_ssh each clone's clock and reseed go over that clone's connection."""
    import json

    ssh_inner.makepyfile(CLONE_ADDRESSES.format(name=debian.name) + (KVM_SSH_SHELL if client == "kvm_ssh" else ""))
    options = [f"--kvm-ssh-key={debian.image.ssh_key}"] if client == "kvm_ssh" else []
    result = run_inner(ssh_inner, "-n", "2", "--kvm-clones=auto", "--kvm-wait=ssh", *options)
    result.assert_outcomes(passed=6)
    if client == "kvm_ssh":
        # each clone: a clone starts from a memory image (agent), then kvm_ssh's connection carries them
        result.stdout.fnmatch_lines_random([f"*-{clone}: *; ready after * (*clock via ssh, reseed via ssh)"
                                            for clone in (0, 1)])
    seen = {tuple(json.loads(path.read_text())) for path in ssh_inner.path.glob("where-*.json")}
    clones = {clone for clone, _ in seen}
    ports = {port for _, port in seen}
    assert len(clones) == 2 and len(ports) == 2, seen
    assert not [d.name() for d in debian.domain().connect().listAllDomains() if "-kvmsnap-" in d.name()]
    debian.assert_as_found()


def test_wait_for_a_hook_of_the_users(ssh_inner: pytest.Pytester, debian: DebianGuest) -> None:
    """--kvm-wait=hook: the user's pytest_kvmsnap_ready (here: an SSH login that retries) gates each test."""
    ssh_inner.makeconftest(SSH_CONFTEST.format(key=debian.image.ssh_key) + """
import time

def pytest_kvmsnap_ready(config, guest, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(guest).close()
            open("ready.log", "a").write(f"ready {guest.generation}\\n")
            return True
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
""")
    ssh_inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{debian.name}")
        @pytest.mark.parametrize("i", [1, 2, 3])
        def test_t(i, ssh):
            assert ssh("test -e /root/marker && echo dirty || echo clean") == "clean"
            ssh("echo {{i}} > /root/marker")
    """)
    result = run_inner(ssh_inner, "--kvm-wait=hook")
    result.assert_outcomes(passed=3)
    assert (ssh_inner.path / "ready.log").read_text().splitlines() == ["ready 0", "ready 1", "ready 2"]
    result.stdout.fnmatch_lines([f"{debian.name}: *; ready after 3 of them in median * s (hook, clock, reseed)"])
    debian.assert_as_found()


@pytest.fixture(scope="module")
def forwarded_debian() -> Iterator[tuple[DebianGuest, int]]:
    """A second Debian guest whose network and SSH forward are only in <qemu:commandline>."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    image = build_debian()
    name = "kvmsnap-it-debfwd"
    wait_until_settled(define_debian(_live_open(), name, image, ssh_forward=port))
    yield DebianGuest(name, image), port
    remove_guest(_live_open(), name)
    image.disk_for(name).unlink(missing_ok=True)


def test_a_forward_from_qemu_commandline_is_found_and_waited_for(
        inner: pytest.Pytester, forwarded_debian: tuple[DebianGuest, int]) -> None:
    """libvirt knows nothing of this guest's network; QEMU does. address() finds the user's own
    forward, --kvm-wait=ssh waits on it (not on 10.0.2.15, which the host cannot reach), and the
    forward is left as found: the plugin did not make it."""
    guest, port = forwarded_debian
    inner.makeconftest(SSH_CONFTEST.format(key=guest.image.ssh_key))
    inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest.name}")
        @pytest.mark.parametrize("i", [1, 2, 3])
        def test_each(i, ssh, kvm_guest):
            assert kvm_guest.address(22) == ("127.0.0.1", {port})
            assert ssh("test -e /root/marker && echo dirty || echo clean") == "clean"
            ssh("echo {{i}} > /root/marker")
    """)
    result = run_inner(inner, "--kvm-wait=ssh", "--kvm-wait-timeout=60")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"{guest.name}: baseline kvmsnap-* 3 revert(s)*; ready after 3 of them in "
                                 "median * s (ssh, clock, reseed)"])
    guest.assert_as_found()
    from pytest_kvmsnap.libvirt.machine import LibvirtMachine

    forwards = LibvirtMachine(guest.domain()).host_forwards()
    assert forwards.get(22) == ("127.0.0.1", port), "the user's forward was removed"


def test_an_address_the_user_names_is_used(inner: pytest.Pytester,
                                           forwarded_debian: tuple[DebianGuest, int]) -> None:
    """--kvm-address NAME=HOST:PORT: address(22) is what the user named ("localhost", where the plugin
    itself would have found 127.0.0.1), and the wait and kvm_ssh go there."""
    guest, port = forwarded_debian
    inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{guest.name}")
        @pytest.mark.parametrize("i", [1, 2])
        def test_each(i, kvm_ssh, kvm_guest):
            assert kvm_guest.address() == ("localhost", {port})
            assert not kvm_ssh.run("test -e /root/marker", check=False).ok, "an earlier test's change leaked"
            kvm_ssh.run("touch /root/marker")
    """)
    result = run_inner(inner, f"--kvm-address={guest.name}=localhost:{port}", "--kvm-wait=ssh",
                       f"--kvm-ssh-key={guest.image.ssh_key}", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    guest.assert_as_found()


TESTINFRA_HOSTS_TESTS = """
    import time, pytest

    @pytest.fixture(scope="module")
    def installed(host):
        host.run("echo app > /root/app")  # testinfra's connection opens before the module's checkpoint

    @pytest.mark.kvm_snapshot("{name}")
    @pytest.mark.parametrize("i", range(3))
    def test_each(i, installed, host):
        start = time.monotonic()
        assert host.file("/root/app").content_string == "app\\n"
        assert not host.file("/root/marker").exists, "an earlier test's change leaked"
        host.run("echo %s > /root/marker", str(i))
        assert time.monotonic() - start < 20, "a stale connection was waited on"
"""


def test_testinfra_hosts_fixture_survives_reverts(inner: pytest.Pytester,
                                                  forwarded_debian: tuple[DebianGuest, int]) -> None:
    """pytest-testinfra's own ``host`` (``--hosts``), cached by testinfra for the whole run and first
    connected before a layer's checkpoint: after each revert the plugin drops its connection, so
    the next command reconnects instead of hanging on a rewound one."""
    guest, port = forwarded_debian
    inner.makepyfile(TESTINFRA_HOSTS_TESTS.format(name=guest.name))
    result = run_inner(inner, f"--hosts=paramiko://root@127.0.0.1:{port}",
                       f"--ssh-identity-file={guest.image.ssh_key}", "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    guest.assert_as_found()
    assert guest.run("ls /root/app")[0] != 0, "the module fixture's work was left"


CLIENT_FIXTURES_TESTS = """
    import time, pytest

    @pytest.fixture(scope="module")
    def app(kvm_guest_factory):  # both connections open before the module's checkpoint
        kvm_guest_factory.testinfra().run("echo app > /root/app")
        kvm_guest_factory.fabric().run("echo fab > /root/fab", hide=True)

    @pytest.mark.kvm_snapshot("{name}")
    @pytest.mark.parametrize("i", range(3))
    def test_each(i, app, kvm_testinfra, kvm_fabric, kvm_guest):
        start = time.monotonic()
        assert kvm_testinfra.file("/root/app").content_string == "app\\n"
        assert kvm_fabric.run("cat /root/fab", hide=True).stdout == "fab\\n"
        assert not kvm_testinfra.file("/root/marker").exists, "an earlier test's change leaked"
        kvm_fabric.run(f"echo {{i}} > /root/marker", hide=True)
        assert kvm_testinfra.file("/root/marker").content_string == f"{{i}}\\n"
        assert kvm_guest.generation == i
        assert time.monotonic() - start < 20, "a stale connection was waited on"
"""


def test_kvm_testinfra_and_kvm_fabric_across_reverts(inner: pytest.Pytester, debian: DebianGuest) -> None:
    """The plugin's testinfra Host and fabric Connection for the guest, from a module fixture (before the
    checkpoint) and the tests, across reverts, with no code of the user's for the address or the key."""
    inner.makepyfile(CLIENT_FIXTURES_TESTS.format(name=debian.name))
    result = run_inner(inner, f"--kvm-ssh-key={debian.image.ssh_key}", "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    debian.assert_as_found()


KVM_SSH_TESTS = """
    import time, pytest

    @pytest.fixture(scope="session")
    def app(kvm_guest_factory):
        ssh = kvm_guest_factory.ssh()  # opened before the checkpoint: the layers rewind it
        ssh.run("echo installed > /root/app")
        return ssh

    @pytest.fixture(scope="module")
    def seed(app):
        app.run("echo seeded > /root/seed")  # the session's client, after a revert or not

    @pytest.mark.kvm_snapshot("{name}")
    @pytest.mark.parametrize("i", range(5))
    def test_each(i, app, seed, kvm_ssh, kvm_guest, tmp_path):
        start = time.monotonic()
        assert app is kvm_ssh  # one client per guest and process
        assert kvm_ssh.run("cat /root/app /root/seed").stdout == "installed\\nseeded"
        assert not kvm_ssh.run("test -e /root/marker", check=False).ok, "an earlier test's change leaked"
        (tmp_path / "up").write_text(str(i))
        kvm_ssh.put(tmp_path / "up", "/root/marker")
        kvm_ssh.get("/root/marker", tmp_path / "down")
        assert (tmp_path / "down").read_text() == str(i)
        assert kvm_guest.generation == i
        assert time.monotonic() - start < 20, "a stale connection was waited on"
"""


def test_kvm_ssh_reconnects_after_every_revert_from_any_fixture_scope(inner: pytest.Pytester,
                                                                      debian: DebianGuest) -> None:
    """The SSH fixture across 5 reverts, used by a session fixture (its connection opened before the
    layer's checkpoint), a module fixture and the tests; files both ways; no hang."""
    inner.makepyfile(KVM_SSH_TESTS.format(name=debian.name))
    result = run_inner(inner, f"--kvm-ssh-key={debian.image.ssh_key}", "--kvm-wait=ssh", "-p", "no:randomly")
    result.assert_outcomes(passed=5)
    debian.assert_as_found()
    assert debian.run("ls /root/app /root/seed")[0] != 0, "the fixtures' work was left"


SETTLED_OVER_SSH = """
    import json, time, pytest
    pytestmark = pytest.mark.kvm_snapshot("{name}")
    @pytest.mark.parametrize("i", [1, 2, 3])
    def test_each(i, kvm_ssh):
        random = kvm_ssh.run("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '").stdout
        offset = time.time() - float(kvm_ssh.run("date +%s.%N").stdout)
        open(f"seen-{{i}}", "w").write(json.dumps([random, offset]))
        time.sleep(10)  # the clock of a restored guest would be this much behind
"""


def test_kvm_ssh_carries_the_clock_and_the_reseed(inner: pytest.Pytester, debian: DebianGuest) -> None:
    """With kvm_ssh in use, the clock and the reseed go over its connection after each revert (no wait for
    the agent), to the resident settle process the baseline holds (no guest process started); the guest
    is within 1 s of the host and reads fresh random bytes each time; the process is gone after the run."""
    inner.makepyfile(SETTLED_OVER_SSH.format(name=debian.name))
    result = run_inner(inner, f"--kvm-ssh-key={debian.image.ssh_key}", "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"{debian.name}: *; ready after 2 of them in median * s "
                                 "(clock via resident, reseed via resident)"])
    seen = [json.loads((inner.path / f"seen-{i}").read_text()) for i in (1, 2, 3)]
    print(f"after reverts 1 and 2 over SSH: guest clock behind by {seen[1][1]:.3f} and {seen[2][1]:.3f} s")
    assert all(abs(offset) < 1.0 for _, offset in seen[1:])
    assert seen[1][0] != seen[2][0], "the same random bytes after two reverts: not reseeded"
    debian.assert_as_found()


def test_the_resident_process_serves_every_xdist_worker(inner: pytest.Pytester, debian: DebianGuest) -> None:
    """Under -n 2 the workers take turns on the guest; the one that took the baseline started the
    resident process, and the other finds it through the run's record.  (A worker's first test
    there settles through the agent: its kvm_ssh connection does not exist yet.)"""
    tests = SETTLED_OVER_SSH.format(name=debian.name).replace("[1, 2, 3]", "range(1, 7)")
    inner.makepyfile(tests.replace("time.sleep(10)", "time.sleep(2)"))
    result = run_inner(inner, f"--kvm-ssh-key={debian.image.ssh_key}", "-p", "no:randomly", "-n", "2")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines([f"{debian.name}: *(clock via resident, reseed via resident, clock, reseed)"])
    assert "via ssh" not in result.stdout.str() and "could not be asked" not in result.stdout.str()
    served = [line.split()[0] for line in result.stdout.lines if "PASSED" in line]
    assert served.count("[gw0]") >= 2 and served.count("[gw1]") >= 2, served  # each settled via it at least once
    seen = [json.loads((inner.path / f"seen-{i}").read_text()) for i in range(1, 7)]
    assert sum(abs(offset) < 1.0 for _, offset in seen) >= 5, seen  # the first test: on the baseline
    debian.assert_as_found()


def test_kvm_resident_off_leaves_no_process_of_the_plugins_in_the_guest(inner: pytest.Pytester,
                                                                        debian: DebianGuest) -> None:
    inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{debian.name}")
        @pytest.mark.parametrize("i", [1, 2])
        def test_each(i, kvm_ssh):
            assert not kvm_ssh.run("ps -eo comm= | grep -x kvmsnap-settle", check=False).ok
    """)
    result = run_inner(inner, f"--kvm-ssh-key={debian.image.ssh_key}", "-p", "no:randomly", "--kvm-resident=off")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"{debian.name}: *(clock via ssh, reseed via ssh)"])
    debian.assert_as_found()


def test_where_sshd_refuses_forwarding_the_settle_program_runs_instead(inner: pytest.Pytester,
                                                                      debian: DebianGuest) -> None:
    """``AllowTcpForwarding no``: no channel to the resident process; the run says so once and settles
    with one guest process per revert, as correct as before."""
    drop_in = "/etc/ssh/sshd_config.d/zz-kvmsnap-test.conf"
    assert debian.run(f"echo 'AllowTcpForwarding no' > {drop_in} && systemctl reload ssh")[0] == 0
    try:
        inner.makepyfile(SETTLED_OVER_SSH.format(name=debian.name))
        result = run_inner(inner, f"--kvm-ssh-key={debian.image.ssh_key}", "-p", "no:randomly")
        result.assert_outcomes(passed=3)
        result.stdout.fnmatch_lines(["*kvmsnap: *: its resident settle process could not be asked (sshd did not "
                                     "connect to it (*)); settling with one guest process instead",
                                     f"{debian.name}: *; ready after 2 of them in median * s "
                                     "(clock via ssh, reseed via ssh)"])
        assert result.stdout.str().count("could not be asked") == 1
        seen = [json.loads((inner.path / f"seen-{i}").read_text()) for i in (1, 2, 3)]
        assert all(abs(offset) < 1.0 for _, offset in seen[1:]) and seen[1][0] != seen[2][0]
    finally:
        assert debian.run(f"rm -f {drop_in} && systemctl reload ssh")[0] == 0
    debian.assert_as_found()


def test_kvm_ssh_says_when_the_credentials_are_the_problem(inner: pytest.Pytester, debian: DebianGuest) -> None:
    inner.makepyfile(f"""
        import pytest
        @pytest.mark.kvm_snapshot("{debian.name}")
        def test_x(kvm_ssh):
            kvm_ssh.run("true")
    """)
    result = run_inner(inner, f"--kvm-ssh-key={debian.image.ssh_key}", "--kvm-ssh-user=nobody", "--kvm-wait=ssh")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*SSHFailed: ssh nobody@127.0.0.1:* (guest *): sshd refused the credentials "
                                 "(user 'nobody', *): *; set --kvm-ssh-user / --kvm-ssh-key"])
    debian.assert_as_found()
