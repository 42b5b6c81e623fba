"""Other libraries' SSH clients across reverts: pytest-testinfra's and fabric's.

An in-place revert rewinds the guest's TCP state, so a connection a client
library keeps open is dead afterwards: used again it hangs until a timeout
(one the snapshot already knew) or fails.  pytest-testinfra keeps one
``Host`` per host spec for the whole process (its ``--hosts`` fixture and
``testinfra.get_host`` share them) and its paramiko backend one connected
client per Host; with a ControlPath its ssh backend keeps a master
connection.  After every revert :func:`drop_testinfra_connections` closes
those without a word to the guest (a goodbye over a rewound connection is
what hangs) and testinfra opens new ones on the next command.  Every
testinfra connection is dropped, not only the reverted guest's: which host
spec reaches which guest is the user's ssh configuration's business.

:func:`make_testinfra_host` and :class:`FabricConnections` give tests the same for
the guest itself.  No pytest here; both libraries are optional.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Any

from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.ssh import SSHGuest, close_silently


def drop_testinfra_connections() -> int:
    """Forget every connection pytest-testinfra holds in this process; how many were dropped.

    Runs after every revert: a process that never imported testinfra holds none, and
    looking in sys.modules costs nothing where a failed import searches the path each time.
    """
    module = sys.modules.get("testinfra.host")
    if module is None:
        return 0
    Host = module.Host
    hosts = [*Host._host_cache.values(), *(host for group in Host._hosts_cache.values() for host in group)]
    return sum(_drop_backend(host.backend) for host in {id(host): host for host in hosts}.values())


def _drop_backend(backend: Any) -> int:
    client = backend.__dict__.pop("client", None)  # the paramiko backend's functools.cached_property
    if client is not None:
        close_silently(client)
        return 1
    if getattr(backend, "NAME", "") in ("ssh", "safe-ssh") and getattr(backend, "controlpath", None):
        return _exit_master(backend)
    return 0


def _exit_master(backend: Any) -> int:
    """Stop the ssh backend's ControlMaster: its connection is rewound (ssh -O exit, as argv)."""
    argv = ["ssh", "-o", f"ControlPath={backend.controlpath}", "-O", "exit"]
    if backend.host.user:
        argv += ["-o", f"User={backend.host.user}"]
    if backend.host.port:
        argv += ["-o", f"Port={backend.host.port}"]
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run([*argv, backend.host.name], capture_output=True, timeout=5, check=False)
        return 1
    return 0


def _host_port(guest: SSHGuest, port: int) -> str:
    host, host_port = guest.address(port)
    return f"[{host}]:{host_port}" if ":" in host else f"{host}:{host_port}"


def make_testinfra_host(guest: SSHGuest, user: str, key: str | None, timeout: float, port: int = 22) -> Any:
    """pytest-testinfra's Host for ``guest`` (its paramiko backend): testinfra caches it, and
    the plugin drops its connection after each revert."""
    try:
        import testinfra
    except ImportError:
        raise KvmSnapError("kvm_testinfra needs pytest-testinfra: pip install 'pytest-kvmsnap[testinfra]'") from None
    options: dict[str, Any] = {"timeout": int(timeout)}
    if key:
        options["ssh_identity_file"] = key
    return testinfra.get_host(f"paramiko://{user}@{_host_port(guest, port)}", **options)


class FabricConnections:
    """One fabric ``Connection`` per guest, made anew when the guest was reverted since."""

    def __init__(self, user: str, key: str | None, timeout: float) -> None:
        self.user, self.key, self.timeout = user, key, timeout
        self._open: dict[str, tuple[int, Any]] = {}  # guest -> (generation, Connection)

    def get(self, guest: SSHGuest, port: int = 22) -> Any:
        try:
            import fabric
        except ImportError:
            raise KvmSnapError("kvm_fabric needs fabric: pip install fabric") from None
        generation, connection = self._open.get(guest.name, (-1, None))
        if connection is None or generation != guest.generation:
            self._forget(guest.name)
            host, host_port = guest.address(port)
            connect = {"key_filename": self.key, "look_for_keys": self.key is None} if self.key else {}
            # in_stream off: under pytest stdin cannot be read, and invoke's stdin thread fails on it
            config = fabric.Config(overrides={"run": {"in_stream": False}})
            connection = fabric.Connection(host, user=self.user, port=host_port, connect_timeout=self.timeout,
                                           connect_kwargs=connect, config=config)
            self._open[guest.name] = (guest.generation, connection)
        return connection

    def _forget(self, name: str) -> None:
        _, connection = self._open.pop(name, (-1, None))
        if connection is not None and connection.client.get_transport() is not None:
            close_silently(connection.client)

    def close(self) -> None:
        for name in list(self._open):
            self._forget(name)
