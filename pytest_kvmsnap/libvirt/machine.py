"""A guest as the engine interface names it (:class:`~pytest_kvmsnap.engine.Machine`): a libvirt domain.

Its operations are cut along the package's modules, each of which holds one
part of the class and the libvirt knowledge behind it: ``snapshots``
(:class:`DomainSnapshots`), ``qemu`` (:class:`QemuProcess`), ``agent``
(:class:`GuestAgent`), ``evidence`` (:class:`Evidence`) and ``network``
(:class:`UserNetwork`).  Each part works on ``native``, the ``virDomain``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from pytest_kvmsnap.libvirt.agent import GuestAgent
from pytest_kvmsnap.libvirt.evidence import Evidence
from pytest_kvmsnap.libvirt.network import UserNetwork
from pytest_kvmsnap.libvirt.qemu import QemuProcess
from pytest_kvmsnap.libvirt.snapshots import DomainSnapshots

if TYPE_CHECKING:
    import libvirt

    from pytest_kvmsnap.engine import Machine


class LibvirtMachine(DomainSnapshots, QemuProcess, GuestAgent, Evidence, UserNetwork):
    def __init__(self, dom: libvirt.virDomain) -> None:
        self.native = dom

    @property
    def name(self) -> str:
        return str(self.native.name())


def native_domain(machine: Machine) -> libvirt.virDomain:
    return cast(LibvirtMachine, machine).native
