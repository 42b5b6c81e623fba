"""A run's lease on a guest, kept on the guest's own hypervisor: an inert domain.

``<guest>.kvmsnap-lease`` is a domain that is never started.  Its description
holds the holder (an :class:`~pytest_kvmsnap.ownership.Owner`) and when the lease
expires by the holder's clock.  Why a domain: it is the one record every libvirt
hypervisor keeps that any host reaches over the remote protocol, with the two
properties a lease needs (checked on libvirt 9.0, see docs/backends.md):

* ``defineXML`` of a name that exists with another UUID is refused, so of two
  hosts defining a lease at once exactly one gets it;
* a domain handle acts by UUID, so once a lease was taken over (undefined and
  defined anew under the same name) its old handle's ``undefine`` and
  ``setMetadata`` fail: a take-over through the handle an expired lease was
  read by is atomic, and the old holder's renewals are fenced off.

Its name must not start like a clone's (``<guest>-kvmsnap-``), which recovery
scans for; it ends in ``.kvmsnap-lease`` so that ``virsh list --all`` says what
it is.  :class:`LibvirtLeases` is the engine's
:class:`~pytest_kvmsnap.engine.Leases`.  No pytest here.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, cast

from pytest_kvmsnap.engine import LeaseHandle
from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.libvirt import connection
from pytest_kvmsnap.ownership import LeaseRecord, Taken

if TYPE_CHECKING:
    import libvirt

SUFFIX = ".kvmsnap-lease"


def lease_name(guest: str) -> str:
    return guest + SUFFIX


def is_lease_name(name: str) -> bool:
    return name.endswith(SUFFIX)


class LibvirtLease:
    """A handle on one lease domain: it acts by UUID, so it fences off a lease taken over."""

    def __init__(self, dom: libvirt.virDomain) -> None:
        self.native = dom

    @property
    def id(self) -> str:
        return str(self.native.UUIDString())


def _dom(handle: LeaseHandle) -> libvirt.virDomain:
    return cast(LibvirtLease, handle).native


class LibvirtLeases:
    """The leases at the hypervisor of connection ``conn``."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn

    def read(self, guest: str) -> tuple[LeaseHandle, LeaseRecord] | None:
        """The guest's lease and what it says; None when there is none.

        A domain of that name that is not a lease (no record in its description) is
        someone else's: an error, and it is never touched.
        """
        libvirt = connection.lib()
        try:
            dom = self.conn.lookupByName(lease_name(guest))
            record = LeaseRecord.from_description(_description(dom))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # none, or it went between the lookup and the read
            raise
        if record is None:
            raise KvmSnapError(f"domain {lease_name(guest)!r} exists but is not a pytest-kvmsnap lease; the "
                               f"plugin keeps the lease on guest {guest!r} under that name: rename that domain")
        return LibvirtLease(dom), record

    def by_id(self, lease_id: str) -> LeaseHandle | None:
        """The lease with that UUID, or None once it is gone (taken over, released)."""
        dom = connection.unless_missing(lambda: self.conn.lookupByUUIDString(lease_id),
                                        connection.lib().VIR_ERR_NO_DOMAIN)
        return None if dom is None else LibvirtLease(dom)

    def reread(self, handle: LeaseHandle) -> LeaseRecord | None:
        """What the lease says now (its handle acts by UUID); None once it is gone or replaced."""
        text = connection.unless_missing(lambda: _description(_dom(handle)), connection.lib().VIR_ERR_NO_DOMAIN)
        return None if text is None else LeaseRecord.from_description(text)

    def define(self, record: LeaseRecord) -> LeaseHandle:
        """Define the lease; :class:`Taken` when a domain of its name exists (another host was first)."""
        libvirt = connection.lib()
        try:
            return LibvirtLease(self.conn.defineXML(_domain_xml(record)))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_ERR_DOM_EXIST) \
                    and "already exists" in str(exc):
                raise Taken(str(exc)) from None
            raise

    def take_over(self, expired: LeaseHandle, record: LeaseRecord) -> LeaseHandle:
        """Replace the expired lease (the handle it was read by) with ``record``.

        Undefining by that handle fails when another host took over first (its lease
        has another UUID), and defining fails when another host defined one in
        between: either way :class:`Taken`, and only one taker wins.
        """
        libvirt = connection.lib()
        try:
            _dom(expired).undefine()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise Taken(str(exc)) from None
            raise
        return self.define(record)

    def renew(self, handle: LeaseHandle, record: LeaseRecord) -> bool:
        """Write ``record`` (a later expiry) into the lease; False when it is no longer there."""
        libvirt = connection.lib()
        try:
            _dom(handle).setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, record.to_description(), None, None,
                                     libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise
        return True

    def release(self, handle: LeaseHandle) -> None:
        """Undefine the lease; one already gone (taken over, removed by hand) is left as it is."""
        connection.unless_missing(_dom(handle).undefine, connection.lib().VIR_ERR_NO_DOMAIN)

    def all(self) -> list[tuple[LeaseHandle, LeaseRecord]]:
        """Every lease at the hypervisor, any run's."""
        found: list[tuple[LeaseHandle, LeaseRecord]] = []
        for dom in self.conn.listAllDomains(connection.lib().VIR_CONNECT_LIST_DOMAINS_INACTIVE):
            if is_lease_name(dom.name()):
                handle = LibvirtLease(dom)
                record = self.reread(handle)
                if record is not None:
                    found.append((handle, record))
        return found

    def is_lease(self, guest: str) -> bool:
        return is_lease_name(guest)


def _description(dom: libvirt.virDomain) -> str:
    libvirt = connection.lib()
    try:
        return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, None, libvirt.VIR_DOMAIN_AFFECT_CONFIG))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return ""
        raise


def _domain_xml(record: LeaseRecord) -> str:
    """An inert domain: never started, no disks, the smallest memory libvirt takes."""
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = lease_name(record.guest)
    ET.SubElement(root, "uuid").text = str(uuid.uuid4())
    ET.SubElement(root, "title").text = (f"pytest-kvmsnap: the lease on guest {record.guest}, "
                                         "held by a test run; never started")
    ET.SubElement(root, "description").text = record.to_description()
    ET.SubElement(root, "memory", unit="KiB").text = "4096"
    ET.SubElement(ET.SubElement(root, "os"), "type").text = "hvm"
    return ET.tostring(root, encoding="unicode")
