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
it is.  No pytest here.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

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


def read(conn: libvirt.virConnect, guest: str) -> tuple[libvirt.virDomain, LeaseRecord] | None:
    """The guest's lease domain and what it says; None when there is none.

    A domain of that name that is not a lease (no record in its description) is
    someone else's: an error, and it is never touched.
    """
    libvirt = connection.lib()
    try:
        dom = conn.lookupByName(lease_name(guest))
        record = LeaseRecord.from_description(_description(dom))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None  # none, or it went between the lookup and the read
        raise
    if record is None:
        raise KvmSnapError(f"domain {lease_name(guest)!r} exists but is not a pytest-kvmsnap lease; the plugin "
                           f"keeps the lease on guest {guest!r} under that name: rename that domain")
    return dom, record


def by_uuid(conn: libvirt.virConnect, lease_uuid: str) -> libvirt.virDomain | None:
    """The lease with that UUID, or None once it is gone (taken over, released)."""
    return connection.unless_missing(lambda: conn.lookupByUUIDString(lease_uuid), connection.lib().VIR_ERR_NO_DOMAIN)


def reread(dom: libvirt.virDomain) -> LeaseRecord | None:
    """What the lease ``dom`` (a handle, so by UUID) says now; None once it is gone or replaced."""
    text = connection.unless_missing(lambda: _description(dom), connection.lib().VIR_ERR_NO_DOMAIN)
    return None if text is None else LeaseRecord.from_description(text)


def define(conn: libvirt.virConnect, record: LeaseRecord) -> libvirt.virDomain:
    """Define the lease; :class:`Taken` when a domain of its name exists (another host was first)."""
    libvirt = connection.lib()
    try:
        return conn.defineXML(_domain_xml(record))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_ERR_DOM_EXIST) \
                and "already exists" in str(exc):
            raise Taken(str(exc)) from None
        raise


def take_over(conn: libvirt.virConnect, expired: libvirt.virDomain, record: LeaseRecord) -> libvirt.virDomain:
    """Replace the expired lease ``expired`` (the handle it was read by) with ``record``.

    Undefining by that handle fails when another host took over first (its lease
    has another UUID), and defining fails when another host defined one in
    between: either way :class:`Taken`, and only one taker wins.
    """
    libvirt = connection.lib()
    try:
        expired.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise Taken(str(exc)) from None
        raise
    return define(conn, record)


def renew(dom: libvirt.virDomain, record: LeaseRecord) -> bool:
    """Write ``record`` (a later expiry) into the lease ``dom``; False when it is no longer there."""
    libvirt = connection.lib()
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, record.to_description(), None, None,
                        libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    return True


def release(dom: libvirt.virDomain) -> None:
    """Undefine the lease ``dom``; one already gone (taken over, removed by hand) is left as it is."""
    connection.unless_missing(dom.undefine, connection.lib().VIR_ERR_NO_DOMAIN)


def all_leases(conn: libvirt.virConnect) -> list[tuple[libvirt.virDomain, LeaseRecord]]:
    """Every lease at the hypervisor, any run's."""
    found = []
    for dom in conn.listAllDomains(connection.lib().VIR_CONNECT_LIST_DOMAINS_INACTIVE):
        if is_lease_name(dom.name()):
            record = reread(dom)
            if record is not None:
                found.append((dom, record))
    return found


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
