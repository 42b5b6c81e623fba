"""Connections to libvirt, its errors as one line each, and looking a domain up.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar, cast
from urllib.parse import urlsplit

from pytest_kvmsnap.exceptions import (
    ConnectionFailed,
    ConnectionLost,
    DomainNotFound,
    KvmSnapError,
)

if TYPE_CHECKING:
    import libvirt

T = TypeVar("T")


def lib() -> ModuleType:
    """Import libvirt on first use and stop it printing errors we report ourselves."""
    try:
        import libvirt
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ConnectionFailed(
            "the libvirt Python bindings are not installed: pip install libvirt-python "
            "(it builds against libvirt-dev and pkg-config)"
        ) from exc
    libvirt.registerErrorHandler(_ignore_error, None)
    return cast(ModuleType, libvirt)


def _ignore_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours carry it instead."""


def open_connection(uri: str) -> libvirt.virConnect:
    libvirt = lib()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise connection_failed(uri, str(exc)) from None


def connection_failed(uri: str, detail: str) -> ConnectionFailed:
    """Why ``uri`` could not be opened, from libvirt's answer ``detail``, with the fix."""
    lowered = detail.lower()
    remote = urlsplit(uri).hostname  # qemu+ssh://user@host/system: another host's daemon
    # A non-root client of qemu:///system is checked by polkit over D-Bus;
    # without a system bus that fails before any permission answer.
    if remote and any(word in lowered for word in ("publickey", "host key verification")):
        hint = (
            f"SSH to {remote} refused: check the user in the URI, its key (?keyfile=...) and "
            "root's known_hosts for that host"
        )
    elif any(word in lowered for word in ("permission denied", "authentication", "polkit",
                                        "system bus", "access denied", "not authorized")):
        hint = (
            "permission was denied: run as root, add your user to the 'libvirt' group, "
            "or use qemu:///session for guests you own"
        )
    elif remote and any(word in lowered for word in ("connection refused", "unable to connect",
                                                      "no route", "timed out", "could not resolve")):
        hint = (
            f"the hypervisor host {remote} cannot be reached, or its libvirtd does not listen: "
            "check that host (is it up, is libvirtd running there, does the transport's port answer?)"
        )
    elif "no such file" in lowered or "connection refused" in lowered or "failed to connect" in lowered:
        hint = (
            "libvirtd does not seem to be running: start it (systemctl start libvirtd, "
            "or 'libvirtd -d' where no init system runs it; scripts/setup-host.sh does both)"
        )
    else:
        hint = "check the URI (--kvm-uri, ini kvm_uri or LIBVIRT_DEFAULT_URI)"
    return ConnectionFailed(f"cannot open libvirt connection {uri!r}: {hint}.\nlibvirt said: {detail}")


SERVICE = "libvirtd"  # what users call the service at a URI, in messages


def lost(uri: str, action: str, exc: Exception) -> ConnectionLost:
    """The plugin's error for a connection that dropped while ``action`` ran."""
    return ConnectionLost(uri, action, str(exc), SERVICE)


def is_lost_connection(exc: Exception) -> bool:
    """Did this libvirt error come from the connection dropping, not from the request?

    Every RPC-layer error means that ("End of file while reading data", "client
    socket is closed", "Cannot write data"); so does using a closed connection.
    """
    libvirt = lib()
    if not isinstance(exc, libvirt.libvirtError):
        return False
    return bool(exc.get_error_domain() == libvirt.VIR_FROM_RPC
                or exc.get_error_code() in (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_NO_CONNECT))


@contextlib.contextmanager
def libvirt_errors(uri: str, action: str) -> Iterator[None]:
    """Turn libvirt's exceptions inside into the plugin's one-line errors.

    A dropped connection becomes :class:`ConnectionLost` (the caller may
    reconnect and retry); any other refusal names the step that failed.
    """
    libvirt = lib()
    try:
        yield
    except libvirt.libvirtError as exc:
        if is_lost_connection(exc):
            raise lost(uri, action, exc) from None
        raise KvmSnapError(f"libvirt failed while {action}: {exc}") from None


def unless_missing(call: Callable[[], T], missing: int) -> T | None:
    """``call()``, or None when libvirt answers that what it asks for is not there (error
    code ``missing``: no such domain, snapshot ...); every other refusal is raised."""
    libvirt = lib()
    try:
        return call()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != missing:
            raise
        return None


def is_alive(conn: libvirt.virConnect) -> bool:
    """One cheap round trip to the daemon: False once the connection is gone."""
    try:
        conn.getLibVersion()
        return bool(conn.isAlive())
    except lib().libvirtError:
        return False


def is_this_host(conn: libvirt.virConnect) -> bool:
    """Does the hypervisor run on this host (so its files and 127.0.0.1 are ours)?"""
    return bool(conn.getHostname() == socket.gethostname())


def lookup_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    libvirt = lib()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        existing = [d.name() for d in conn.listAllDomains()]
        raise DomainNotFound(name, conn.getURI(), existing) from None
