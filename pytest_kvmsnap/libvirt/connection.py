"""Connections to libvirt, its errors as one line each, and looking a domain up.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar, cast

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
        raise ConnectionFailed.from_libvirt(uri, str(exc)) from None


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
            raise ConnectionLost(uri, action, str(exc)) from None
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
