"""One SSH connection cached across tests, made safe for reverts.

An in-place revert rewinds the guest's TCP state to the baseline's moment: a
client opened before it is dead after it (paramiko raises EOFError, then "SSH
session not active" for every later test; pytest-testinfra and fabric cache
their clients the same way).  The pattern: keep the client together with the
guest's ``generation``, which changes with every revert, and reconnect when it
changed.  ``--kvm-wait=ssh`` makes sure sshd answers before each test starts.

Run against a guest with sshd, e.g. pytest-kvmsnap's Debian test guest:

    KVMSNAP_SSH_KEY=/var/lib/libvirt/images/kvmsnap/debian/id_ed25519 \\
        pytest examples/ssh --kvm-domain=<guest> --kvm-wait=ssh
"""

import os

import paramiko
import pytest


class CachedSSH:
    """A paramiko client reused while the guest's generation stays the same."""

    def __init__(self):
        self.client = None
        self.generation = None

    def client_for(self, guest):
        if self.client is None or self.generation != guest.generation:
            self.close()  # the guest was reverted since: this connection is dead
            host, port = guest.address(22)
            self.client = paramiko.SSHClient()
            self.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            self.client.connect(host, port, os.environ.get("KVMSNAP_SSH_USER", "root"),
                                key_filename=os.environ["KVMSNAP_SSH_KEY"], look_for_keys=False,
                                allow_agent=False, timeout=10)
            self.generation = guest.generation
        return self.client

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None


@pytest.fixture(scope="module")
def ssh_cache():
    cache = CachedSSH()
    yield cache
    cache.close()


@pytest.fixture
def ssh(ssh_cache, kvm_guest):
    """Run a shell command in the guest over the cached connection: (exit status, output)."""
    client = ssh_cache.client_for(kvm_guest)

    def run(command):
        _, out, _ = client.exec_command(command, timeout=60)
        text = out.read().decode().strip()
        return out.channel.recv_exit_status(), text

    return run
