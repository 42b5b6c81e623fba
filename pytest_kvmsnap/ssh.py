"""Commands and files over SSH on a test's guest, across reverts.

An in-place revert rewinds the guest's TCP state: a client opened before it is
dead after it, and its next use can hang until its timeout rather than fail.
:class:`GuestSSH` keeps one paramiko client per guest *generation* (reverts so
far): when the guest was reverted since, the old connection is dropped without
a word to the guest (its socket closed: saying goodbye over a rewound
connection is what hangs) and a new one is opened.  Every step is bounded in
time, and a failure says which part failed: the guest (nothing accepts the
connection), sshd (no banner, no session) or the credentials.

paramiko is what pytest-testinfra's paramiko backend and fabric use; it is an
optional extra (``pip install pytest-kvmsnap[ssh]``).  No pytest here.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guestside import NO_PERL, partial, settle_command
from pytest_kvmsnap.resident import Resident, ResidentUnavailable, check_answer

if TYPE_CHECKING:
    import paramiko


class SSHFailed(KvmSnapError):
    """An SSH step on a guest failed; the message says whether the guest, sshd or the credentials."""


class SSHGuest(Protocol):
    """What the client needs of a guest (pytest_kvmsnap.Guest)."""

    @property
    def name(self) -> str: ...

    @property
    def generation(self) -> int: ...

    def address(self, port: int = 22) -> tuple[str, int]: ...


@dataclass(frozen=True)
class CommandResult:
    command: str
    status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == 0


def close_silently(client: Any) -> None:
    """Close a paramiko client whose connection may be rewound: its socket first, so that the
    transport's goodbye does not go out over it (that is what hangs)."""
    sock = getattr(client.get_transport(), "sock", None)
    if isinstance(sock, socket.socket):
        sock.close()
    client.close()


def _paramiko() -> Any:
    try:
        import paramiko
    except ImportError:
        raise SSHFailed("kvm_ssh needs paramiko: pip install 'pytest-kvmsnap[ssh]'") from None
    return paramiko


class GuestSSH:
    """One guest's SSH connection, opened on first use and again after every revert."""

    def __init__(self, guest: SSHGuest, user: str = "root", key: str | None = None, timeout: float = 30.0,
                 port: int = 22) -> None:
        self.guest, self.user, self.key, self.timeout, self.port = guest, user, key, timeout, port
        self._client: paramiko.SSHClient | None = None
        self._generation = -1
        self._where = ""

    @property
    def client(self) -> paramiko.SSHClient:
        """The connected paramiko client for the guest as it is now (reconnected after a revert)."""
        if self._client is None or self._generation != self.guest.generation:
            self.close()
            self._generation = self.guest.generation
            self._client = self._connect()
        return self._client

    def run(self, command: str, *, check: bool = True, timeout: float | None = None) -> CommandResult:
        """Run ``command`` by the login shell; with ``check``, a non-zero exit raises."""
        limit = self.timeout if timeout is None else timeout
        try:
            stdin, out, err = self.client.exec_command(command, timeout=limit)
            stdin.close()
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
            status = out.channel.recv_exit_status()
        except (OSError, _paramiko().SSHException) as exc:
            self._drop()
            raise SSHFailed(f"{self._where}: {command!r} did not complete within {limit:g} s or its session "
                            f"broke ({type(exc).__name__}: {exc}); the guest or sshd stopped answering") from None
        result = CommandResult(command, status, stdout.rstrip("\n"), stderr.rstrip("\n"))
        if check and not result.ok:
            raise SSHFailed(f"{self._where}: {command!r} exited {status}: {result.stderr or result.stdout}"[:2000])
        return result

    def settle(self, clock: bool, reseed: bool) -> str | None:
        """Set the guest's clock from the host's and/or force a reseed with host bytes, in one
        guest process where it can (guestside.py); as root, else through ``sudo -n``.  None, or why the reseed
        was only partial; SSHFailed when the clock or the reseed failed.

        The host's time is sent when the guest's settle program asks for it, so
        the time it takes to open the session and start it does not make the clock late.
        """
        command = settle_command(clock, reseed)
        if self.user != "root":
            command = f"sudo -n sh -c {shlex.quote(command)}"
        try:
            stdin, out, err = self.client.exec_command(command, timeout=self.timeout)
            asked = out.readline().strip() == "ready"
            if asked:  # else it ended before asking (sudo wanted a password, say): its stderr says why
                stdin.write(f"{time.time():.6f} {os.urandom(64).hex()}\n")
                stdin.flush()
            stdin.close()
            stderr = err.read().decode(errors="replace")
            status = out.channel.recv_exit_status()
        except (OSError, _paramiko().SSHException) as exc:
            self._drop()
            raise SSHFailed(f"{self._where}: setting the clock and reseeding did not complete within "
                            f"{self.timeout:g} s ({type(exc).__name__}: {exc})") from None
        if not asked:
            starter = "the login shell" if self.user == "root" else "sudo"
            raise SSHFailed(f"{self._where}: {starter} did not start the settle script (exit {status}): "
                            f"{stderr.strip()[:300] or 'no message'}")
        if status in (0, NO_PERL):
            return None if status == 0 else partial(status, stderr)
        raise SSHFailed(f"{self._where}: {partial(status, stderr)}")

    def ask_resident(self, resident: Resident, clock: bool, reseed: bool) -> None:
        """Clock and/or reseed through the guest's resident settle process (resident.py): sshd
        connects a channel to its loopback port, and no guest process is started.

        ResidentUnavailable when it cannot be asked (then the caller runs the settle
        program); KvmSnapError when it was asked and a step failed.
        """
        paramiko = _paramiko()
        try:
            transport = self.client.get_transport()
            assert transport is not None, "a connected client has a transport"
            channel = transport.open_channel("direct-tcpip", ("127.0.0.1", resident.port), ("127.0.0.1", 0),
                                             timeout=self.timeout)
        except paramiko.ChannelException as exc:  # 1: forwarding refused by sshd; 2: nothing listens
            raise ResidentUnavailable(f"sshd did not connect to it ({exc.text})", lasting=exc.code == 1) from None
        except (OSError, paramiko.SSHException) as exc:
            self._drop()
            raise SSHFailed(f"{self._where}: no channel to the resident settle process within {self.timeout:g} s "
                            f"({type(exc).__name__}: {exc})") from None
        try:
            channel.settimeout(self.timeout)
            channel.sendall(resident.request(clock, reseed))  # the host's time as the channel opened
            answer = channel.makefile("r").readline()
        except (OSError, paramiko.SSHException) as exc:
            raise ResidentUnavailable(f"no answer within {self.timeout:g} s ({type(exc).__name__}: {exc})") from None
        finally:
            channel.close()
        check_answer(answer)

    def put(self, local: str | Path, remote: str) -> None:
        """Copy a local file to ``remote`` on the guest (SFTP)."""
        self._sftp(lambda sftp: sftp.put(str(local), remote), f"copying {local} to {remote}")

    def get(self, remote: str, local: str | Path) -> None:
        """Copy ``remote`` from the guest to a local file (SFTP)."""
        self._sftp(lambda sftp: sftp.get(remote, str(local)), f"copying {remote} from the guest")

    def close(self) -> None:
        """Forget the connection without talking to the guest (a rewound one would hang)."""
        self._drop()

    def _sftp(self, step: Any, what: str) -> None:
        try:
            sftp = self.client.open_sftp()
            sftp.get_channel().settimeout(self.timeout)
            try:
                step(sftp)
            finally:
                sftp.close()
        except (OSError, _paramiko().SSHException) as exc:
            self._drop()
            raise SSHFailed(f"{self._where}: {what} failed ({type(exc).__name__}: {exc})") from None

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            close_silently(client)

    def _connect(self) -> paramiko.SSHClient:
        paramiko = _paramiko()
        host, port = self.guest.address(self.port)
        self._where = f"ssh {self.user}@{host}:{port} (guest {self.guest.name!r})"
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
        except OSError as exc:
            raise SSHFailed(f"{self._where}: no connection within {self.timeout:g} s ({exc}): the guest is down, "
                            "unreachable from here, or nothing listens on its port; if the address is wrong, "
                            "name the right one with --kvm-address NAME=HOST[:PORT]") from None
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # every revert may bring a test guest's key
        try:
            client.connect(host, port, self.user, key_filename=self.key, look_for_keys=self.key is None,
                           allow_agent=self.key is None, sock=sock, timeout=self.timeout,
                           banner_timeout=self.timeout, auth_timeout=self.timeout)
        except paramiko.AuthenticationException as exc:
            sock.close()
            key = self.key or "the default keys and ssh-agent"
            raise SSHFailed(f"{self._where}: sshd refused the credentials (user {self.user!r}, {key}): {exc}; "
                            "set --kvm-ssh-user / --kvm-ssh-key") from None
        except (OSError, paramiko.SSHException) as exc:
            sock.close()
            raise SSHFailed(f"{self._where}: the connection opened but sshd did not complete the handshake within "
                            f"{self.timeout:g} s ({type(exc).__name__}: {exc}): sshd is not ready or not "
                            "answering") from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(5)
        return client

    def __repr__(self) -> str:
        return f"<GuestSSH {self.user}@{self.guest.name} generation={self._generation}>"

