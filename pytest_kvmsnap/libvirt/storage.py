"""Disk copies through libvirt's storage API, so the hypervisor may be another host.

libvirt's own copy, ``virStorageVolCreateXMLFrom``, runs ``qemu-img convert``
for a qcow2 volume, and that drops the image's internal snapshots -- the
baseline a clone starts from, memory included, is one (and its ``REFLINK`` flag
is refused for qcow2).  So a copy here relays the image's bytes from a download
stream to an upload stream, both sparse: holes travel as lengths, not zeros.
The bytes pass through this process's memory, never its disks, and libvirtd
reads and writes the files on whichever host it runs.

Every directory the plugin creates on the hypervisor is a storage pool of its
own, defined (so a libvirtd restart does not forget it) and named after what it
holds; an ``owner.json`` volume in it says which run made it, so a later run on
any host can tell a dead run's leftovers from a live run's.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pytest_kvmsnap.exceptions import UnsupportedGuest
from pytest_kvmsnap.libvirt import connection
from pytest_kvmsnap.ownership import Owner

if TYPE_CHECKING:
    import libvirt

OWNER_VOLUME = "owner.json"


def _volume_xml(name: str, capacity: int) -> str:
    """A raw volume: libvirt creates an empty file and runs no image tool on it."""
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name  # names are data: ElementTree escapes them
    ET.SubElement(root, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(root, "allocation", unit="bytes").text = "0"
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "format", type="raw")
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = "0600"
    return ET.tostring(root, encoding="unicode")


def _pool_xml(name: str, path: str) -> str:
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = name
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "path").text = path
    return ET.tostring(root, encoding="unicode")


def physical_size(volume: libvirt.virStorageVol) -> int:
    """The file's length on the hypervisor (a qcow2 volume's capacity is its virtual size)."""
    root = ET.fromstring(volume.XMLDesc(0))
    physical = root.findtext("physical") or root.findtext("target/physical")
    return int(physical) if physical else int(volume.info()[2])


READ_POOL_WAIT = 30.0  # seconds to get a volume for a file while other runs' pools come and go


@contextmanager
def volume_at(conn: libvirt.virConnect, path: str, pool_name: str) -> Iterator[libvirt.virStorageVol]:
    """The volume for the file ``path`` on the hypervisor: through the pool over its
    directory, else through a transient pool ``pool_name`` made for the read and
    destroyed after it (it changes nothing on disk)."""
    volume, made = _find_volume(conn, path, pool_name)
    try:
        yield volume if made is None else made.storageVolLookupByName(posixpath.basename(path))
    finally:
        if made is not None:
            made.destroy()


def _find_volume(conn: libvirt.virConnect, path: str,
                 pool_name: str) -> tuple[libvirt.virStorageVol | None, libvirt.virStoragePool | None]:
    """``path``'s volume in the pool over its directory, or (None, a transient pool made there).

    libvirt allows one pool per directory.  Another run's transient pool there is
    used like any other (a download keeps its own file descriptor, so that pool
    may go meanwhile); an inactive one is the user's to start.
    """
    libvirt = connection.lib()
    directory = posixpath.dirname(path)
    deadline = time.monotonic() + READ_POOL_WAIT
    while True:
        try:
            holder = next((pool for pool in conn.listAllStoragePools() if pool_path(pool) == directory), None)
            if holder is None:
                return None, conn.storagePoolCreateXML(_pool_xml(pool_name, directory), 0)
            if not holder.isActive():
                raise UnsupportedGuest(f"--kvm-clones reads {path} through libvirt's storage API, but pool "
                                       f"{holder.name()!r} over its directory is inactive: start it "
                                       f"(virsh pool-start {holder.name()}), or drop --kvm-clones")
            holder.refresh(0)  # it may predate the file
            return conn.storageVolLookupByPath(path), None
        except libvirt.libvirtError as exc:
            if time.monotonic() > deadline:  # pools kept coming and going, or libvirt refuses
                raise UnsupportedGuest(f"--kvm-clones cannot read {path} through libvirt's storage API: "
                                       f"{exc.get_error_message()}") from None
            time.sleep(0.1)  # a pool came or went between two calls: look again


def copy(source: libvirt.virStorageVol, pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol:
    """Copy ``source`` byte for byte (internal snapshots included) as volume ``name`` of ``pool``."""
    libvirt = connection.lib()
    target = pool.createXML(_volume_xml(name, physical_size(source)), 0)
    conn = pool.connect()
    down, up = conn.newStream(0), conn.newStream(0)
    try:
        source.download(down, 0, 0, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
        target.upload(up, 0, 0, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
        down.sparseRecvAll(lambda _stream, data, _: up.send(data),
                           lambda _stream, length, _: up.sendHole(length), None)
        down.finish()
        up.finish()
    except BaseException:
        for stream in (down, up):
            with contextlib.suppress(libvirt.libvirtError):  # finished or broken: the error raised matters
                stream.abort()
        _delete_volume(target)
        raise
    return target


def copy_file(conn: libvirt.virConnect, path: str, pool: libvirt.virStoragePool, name: str,
              read_pool: str, attempts: int = 3) -> libvirt.virStorageVol:
    """Copy the hypervisor's file ``path`` as volume ``name`` of ``pool`` (see volume_at).

    Read through another run's pool over the same directory, the volume can
    vanish between its lookup and the download starting (that run destroyed
    its pool): then the copy starts again.
    """
    libvirt = connection.lib()
    vanished = (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_OPERATION_INVALID)
    for attempt in range(1, attempts + 1):
        try:
            with volume_at(conn, path, read_pool) as volume:
                return copy(volume, pool, name)
        except libvirt.libvirtError as exc:
            if attempt == attempts or exc.get_error_code() not in vanished:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def write_volume(pool: libvirt.virStoragePool, name: str, data: bytes) -> None:
    volume = pool.createXML(_volume_xml(name, len(data)), 0)
    stream = pool.connect().newStream(0)
    volume.upload(stream, 0, len(data), 0)
    stream.send(data)
    stream.finish()


def read_volume(volume: libvirt.virStorageVol) -> bytes:
    stream = volume.connect().newStream(0)
    volume.download(stream, 0, 0, 0)
    chunks = []
    while chunk := stream.recv(262144):
        if isinstance(chunk, int):  # -2: a non-blocking stream, which this is not
            raise TypeError(chunk)
        chunks.append(chunk)
    stream.finish()
    return b"".join(chunks)


# --- the plugin's own pools ---------------------------------------------------


def make_pool(conn: libvirt.virConnect, name: str, path: str, owner: Owner) -> libvirt.virStoragePool:
    """Define, build (mkdir on the hypervisor) and start pool ``name`` at ``path``, owned by ``owner``.

    Defined and autostarted, so that after a libvirtd restart it is still there and
    active, and its owner volume readable by whoever finds it.
    """
    pool = conn.storagePoolDefineXML(_pool_xml(name, path), 0)
    try:
        pool.build(0)  # mkdir on the hypervisor; the name holds the run id, so it is new
        pool.setAutostart(1)
        pool.create(0)
        write_volume(pool, OWNER_VOLUME, owner.to_json().encode())
    except BaseException:
        remove_pool(pool)
        raise
    return pool


def pool_owner(pool: libvirt.virStoragePool) -> Owner | None:
    """The run that made ``pool``; None when it is not one of the plugin's, or unreadable
    (an inactive pool is not started to find out: the plugin's own start with libvirtd)."""
    libvirt = connection.lib()
    try:
        if not pool.isActive():
            return None
        return Owner.from_json(read_volume(pool.storageVolLookupByName(OWNER_VOLUME)).decode())
    except (libvirt.libvirtError, UnicodeDecodeError):
        return None


def is_empty(pool: libvirt.virStoragePool) -> bool:
    """Does the pool hold no volume at all (an inactive one is started to look; one whose
    directory is gone holds nothing)?"""
    if not _started(pool):
        return True
    pool.refresh(0)
    return int(pool.numOfVolumes()) == 0


def _started(pool: libvirt.virStoragePool) -> bool:
    """Is the pool active, once started if it was not?  False: its directory is gone, only the
    definition is left."""
    if not pool.isActive():
        with contextlib.suppress(connection.lib().libvirtError):
            pool.create(0)
    return bool(pool.isActive())


def pools(conn: libvirt.virConnect, prefix: str) -> list[libvirt.virStoragePool]:
    return [pool for pool in conn.listAllStoragePools() if pool.name().startswith(prefix)]


def pool_path(pool: libvirt.virStoragePool) -> str:
    return ET.fromstring(pool.XMLDesc(0)).findtext("target/path") or ""


def _delete_volume(volume: libvirt.virStorageVol) -> None:
    with contextlib.suppress(connection.lib().libvirtError):  # gone already
        volume.delete(0)


def remove_pool(pool: libvirt.virStoragePool) -> None:
    """Delete the pool's volumes, its directory and the pool itself.

    Only for a pool the plugin made (``make_pool``): its directory was made for
    it, named with the run's id, so every volume in it is the run's.
    """
    libvirt = connection.lib()
    if _started(pool):
        pool.refresh(0)
        for volume in pool.listAllVolumes(0):
            _delete_volume(volume)
        pool.destroy()
        with contextlib.suppress(libvirt.libvirtError):  # what is no volume (a socket, say) stays, and it
            pool.delete(0)  # rmdir: only an empty directory
    if pool.isPersistent():
        pool.undefine()
