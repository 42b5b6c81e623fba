"""The SSH suite the Debian benchmark runs: each test logs in afresh, as a user's would.

Each test checks that the previous test's marker is gone (unless nothing
reverts), writes its own, and logs out.  The connection retries until sshd
answers, as a hand-written suite must after a revert; with ``--kvm-wait=ssh``
the plugin has already waited.  ``KVMSNAP_BENCH_HANDWRITTEN`` runs it without
the plugin, reverting with ``revertToSnapshot`` or ``loadvm`` (or not at all)
after each test, like bench_suite.py.
"""

import os
import time

import paramiko
import pytest
from bench_suite import EXPECT_CLEAN, HANDWRITTEN, N, handwritten_revert, handwritten_snapshot  # noqa: F401

from pytest_kvmsnap.libvirt.machine import LibvirtMachine

KEY = os.environ.get("KVMSNAP_BENCH_SSH_KEY", "")


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


@pytest.mark.kvm_snapshot
@pytest.mark.parametrize("i", range(N))
def test_over_ssh(i, address):
    client = login(address)
    try:
        if EXPECT_CLEAN:
            assert run(client, "cat /root/marker 2>/dev/null") == "", f"test {i} found the previous marker"
        run(client, f"echo {i} > /root/marker")
    finally:
        client.close()
