"""The :class:`~pytest_kvmsnap.engine.Engine` over libvirt: QEMU/KVM guests, local or remote.

An engine is one connection; its guests are :class:`~pytest_kvmsnap.libvirt.machine.LibvirtMachine`,
its leases :class:`~pytest_kvmsnap.libvirt.leases.LibvirtLeases` and its clones
:class:`~pytest_kvmsnap.libvirt.clones.LibvirtClones`, each implemented in its own module.
:class:`LibvirtKind` opens engines by URI and says which of libvirt's errors mean what.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, cast

from pytest_kvmsnap.engine import Advice, Capabilities, Clones, Leases, Machine
from pytest_kvmsnap.libvirt import agent, connection, preflight
from pytest_kvmsnap.libvirt.advice import VirshAdvice
from pytest_kvmsnap.libvirt.clones import LibvirtClones
from pytest_kvmsnap.libvirt.leases import LibvirtLeases
from pytest_kvmsnap.libvirt.machine import LibvirtMachine

if TYPE_CHECKING:
    import libvirt


class LibvirtEngine:
    def __init__(self, uri: str, conn: libvirt.virConnect) -> None:
        self._uri = uri
        self.native = conn
        self._leases, self._clones = LibvirtLeases(conn), LibvirtClones(conn)

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def leases(self) -> Leases:
        return self._leases

    @property
    def clones(self) -> Clones:
        return self._clones

    def capabilities(self) -> Capabilities:
        # The in-place revert and port forwarding go through QEMU's monitor; other
        # libvirt drivers (test:///, Xen) have none and fall back per guest.
        qemu = str(self.native.getType()).upper().startswith("QEMU")
        return Capabilities(hot_revert=qemu, memory=True, clones=True, leases=True, agent=qemu,
                            screenshot=True, port_forward=qemu)

    def is_alive(self) -> bool:
        return connection.is_alive(self.native)

    def hostname(self) -> str:
        return str(self.native.getHostname())

    def is_this_host(self) -> bool:
        return connection.is_this_host(self.native)

    def machine(self, name: str, *, checked: bool = True) -> Machine:
        dom = connection.lookup_domain(self.native, name)
        if checked:
            preflight.preflight(self.native, dom)
        return LibvirtMachine(dom)

    def guest_names(self) -> list[str]:
        return [str(dom.name()) for dom in self.native.listAllDomains()]

    def close(self) -> None:
        self.native.close()


class LibvirtKind:
    """Engines over libvirt, one per URI."""

    @property
    def service(self) -> str:
        return connection.SERVICE

    @property
    def advice(self) -> Advice:
        return VirshAdvice()

    @property
    def refusal(self) -> type[Exception]:
        return cast(type[Exception], connection.lib().libvirtError)

    def open(self, uri: str) -> LibvirtEngine:
        return LibvirtEngine(uri, connection.open_connection(uri))

    def errors(self, uri: str, action: str) -> AbstractContextManager[None]:
        return connection.libvirt_errors(uri, action)

    def agent_unavailable(self, exc: Exception) -> bool:
        return agent.is_agent_unavailable(exc)


LIBVIRT = LibvirtKind()

