"""The SSH suite the Debian benchmark runs: each test logs in afresh, as a user's would.

Each test checks that the previous test's marker is gone (unless nothing
reverts), writes its own, and logs out.  The connection retries until sshd
answers, as a hand-written suite must after a revert; with ``--kvm-wait=ssh``
the plugin has already waited.  ``KVMSNAP_BENCH_HANDWRITTEN`` runs it without
the plugin, reverting with ``revertToSnapshot`` or ``loadvm`` (or not at all)
after each test, like bench_suite.py.  ``KVMSNAP_BENCH_KVM_SSH=1`` runs each
test's commands through the plugin's ``kvm_ssh`` instead of its own client.

With ``KVMSNAP_BENCH_TIMES`` each test appends to that file when its first
command completed and when its last did: the gap from one test's last
command to the next one's first is the revert-to-usable time (teardown,
revert, the plugin's steps, login, a first command), measured the same way
with and without the plugin.
"""

import json
import os
import time

import paramiko
import pytest
from bench_suite import EXPECT_CLEAN, HANDWRITTEN, N, handwritten_revert, handwritten_snapshot  # noqa: F401

from pytest_kvmsnap.libvirt.machine import LibvirtMachine

KEY = os.environ.get("KVMSNAP_BENCH_SSH_KEY", "")
KVM_SSH = os.environ.get("KVMSNAP_BENCH_KVM_SSH", "") == "1"
TIMES = os.environ.get("KVMSNAP_BENCH_TIMES", "")


def stamp(i, what):
    if TIMES:
        with open(TIMES, "a") as times:
            times.write(json.dumps([i, what, time.time()]) + "\n")


@pytest.fixture
def address(request):
    if not HANDWRITTEN:
        yield request.getfixturevalue("kvm_guest").address(22)
        return
    dom, snap = request.getfixturevalue("handwritten_snapshot")
    # A hand-written suite forwards a port itself, and again after revertToSnapshot
    # (a new QEMU process has none): one per test is the simple way.
    machine = LibvirtMachine(dom)
    yield "127.0.0.1", machine.forward_port(machine.user_network() or "", 22)
    handwritten_revert(dom, snap)


def login(address):
    deadline = time.monotonic() + 120
    while True:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(*address, username="root", key_filename=KEY, look_for_keys=False, allow_agent=False,
                           timeout=5, banner_timeout=5, auth_timeout=5)
            return client
        except (OSError, paramiko.SSHException):
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run(client, command):
    _, out, _ = client.exec_command(command, timeout=60)
    return out.read().decode().strip()


class OwnClient:
    """What a user's suite does: log in afresh in each test."""

    def __init__(self, address):
        self.client = login(address)

    def __call__(self, command):
        return run(self.client, command)

    def close(self):
        self.client.close()


class PluginClient:
    """The plugin's kvm_ssh: reconnected after each revert, reused within a test."""

    def __init__(self, kvm_ssh):
        self.kvm_ssh = kvm_ssh

    def __call__(self, command):
        return self.kvm_ssh.run(command, check=False).stdout

    def close(self):
        pass


# Each asked for by name, as a user's suite does: the plugin sees at collection which
# tests use kvm_ssh (it starts the guest's resident settle process for them).
if KVM_SSH:
    @pytest.fixture
    def shell(kvm_ssh):
        return PluginClient(kvm_ssh)
else:
    @pytest.fixture
    def shell(address):
        return OwnClient(address)


@pytest.mark.kvm_snapshot
@pytest.mark.parametrize("i", range(N))
def test_over_ssh(i, shell):
    try:
        found = shell("cat /root/marker 2>/dev/null")
        stamp(i, "usable")
        if EXPECT_CLEAN:
            assert found == "", f"test {i} found the previous marker"
        shell(f"echo {i} > /root/marker")
        stamp(i, "done")
    finally:
        shell.close()
