"""Reaching a guest's ports: its user-mode network and QEMU's forwards, or its address.

:class:`UserNetwork` is that part of a :class:`~pytest_kvmsnap.libvirt.machine.LibvirtMachine`.
"""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from pytest_kvmsnap.exceptions import (
    KvmSnapError,
)
from pytest_kvmsnap.libvirt.connection import lib
from pytest_kvmsnap.libvirt.qemu import HMP_SAFE, hmp

if TYPE_CHECKING:
    import libvirt


# ``info usernet``: a header per user-mode network, and a line per connection or forward.
_USERNET_HUB = re.compile(r"^Hub -?\d+ \(([^)]+)\):", re.MULTILINE)
_USERNET_FORWARD = re.compile(r"^\s*TCP\[HOST_FORWARD\]\s+\d+\s+(\S+)\s+(\d+)\s+\S+\s+(\d+)\b", re.MULTILINE)


def parse_usernet(text: str) -> tuple[list[str], dict[int, tuple[str, int]]]:
    """QEMU's ``info usernet``: the user-mode networks' netdev ids, and guest TCP port -> (host
    address, host port) of each forward.  An unspecified host address is any: 127.0.0.1 reaches it."""
    forwards: dict[int, tuple[str, int]] = {}
    for host, host_port, guest_port in _USERNET_FORWARD.findall(text):
        address = "127.0.0.1" if host in ("*", "0.0.0.0") else host
        forwards.setdefault(int(guest_port), (address, int(host_port)))
    return _USERNET_HUB.findall(text), forwards


class UserNetwork:
    """The ports of the domain ``native``: its user-mode network's forwards, or its address."""

    native: libvirt.virDomain

    def user_network(self) -> str | None:
        """QEMU's id for the guest's first user-mode (SLIRP) network backend, if it has one.

        From libvirt's ``<interface type='user'>``, else from QEMU itself: many
        guests get their user-mode network from ``<qemu:commandline>``
        (``-netdev user,id=n0,hostfwd=...``), which libvirt knows nothing of.
        """
        root = ET.fromstring(self.native.XMLDesc(0))
        for interface in root.iterfind("devices/interface"):
            alias = interface.find("alias")
            if interface.get("type") == "user" and alias is not None and alias.get("name"):
                return f"host{alias.get('name')}"  # libvirt names the backend of device netN hostnetN
        if root.find("{http://libvirt.org/schemas/domain/qemu/1.0}commandline") is None or not self.native.isActive():
            return None  # libvirt made every netdev: it listed them above
        netdevs, _forwards = parse_usernet(hmp(self.native, "info usernet"))
        return next((netdev for netdev in netdevs if HMP_SAFE.match(netdev)), None)

    def host_forwards(self) -> dict[int, tuple[str, int]]:
        """Guest TCP port -> (host address, host port) of every forward QEMU has now, whoever made it
        (``<qemu:commandline>`` hostfwd, libvirt, this plugin)."""
        return parse_usernet(hmp(self.native, "info usernet"))[1]

    def forward_port(self, network: str, guest_port: int) -> int:
        """Forward a free port on the host's 127.0.0.1 to ``guest_port``; the host port."""
        for _ in range(5):  # a port found free may be taken before QEMU binds it
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            reply = hmp(self.native, f"hostfwd_add {network} tcp:127.0.0.1:{port}-:{int(guest_port)}").strip()
            if not reply:
                return port
        raise KvmSnapError(f"QEMU could not forward a host port to {self.native.name()!r}'s port {guest_port}: {reply}")

    def remove_forward(self, network: str, host_port: int) -> None:
        hmp(self.native, f"hostfwd_remove {network} tcp:127.0.0.1:{int(host_port)}")

    def ipv4(self) -> str | None:
        """The guest's IPv4 address: from libvirt's DHCP leases, else the agent, else the ARP table."""
        libvirt = lib()
        sources = (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
                   libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP)
        for source in sources:
            try:
                interfaces = self.native.interfaceAddresses(source, 0) or {}
            except libvirt.libvirtError:
                continue
            for info in interfaces.values():
                for address in info.get("addrs") or []:
                    if address.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 and not address["addr"].startswith("127."):
                        return str(address["addr"])
        return None
