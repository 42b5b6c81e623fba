"""Build, define and remove pytest-kvmsnap's tiny real test guest.

The guest is made from Debian packages only: the cloud kernel (``apt-get
download`` + ``dpkg -x``) for ``vmlinuz`` and the virtio modules, a
``busybox-static`` initramfs whose init drives the serial console, and an ext4
data disk (``mkfs.ext4 -d``) converted to qcow2 so it can hold internal
snapshots.  It boots in a few seconds under TCG.  Outputs are cached in
``KVMSNAP_GUEST_DIR`` (default ``/var/lib/libvirt/images/kvmsnap``) and never
belong in the repository; building again reuses what is there.
"""

from __future__ import annotations

import glob
import gzip
import lzma
import os
import pwd
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import libvirt

DEFAULT_DIR = "/var/lib/libvirt/images/kvmsnap"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
# virtio_ring must be loaded before virtio, virtio's PCI helpers before virtio_pci.
MODULES = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "virtio_blk"]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo 1 > /proc/sys/kernel/printk
for m in MODULES; do insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done
mount -o sync /dev/vda /data || echo "KVMSNAP-NO-DATA-DISK"
exec 0</dev/ttyS0 1>/dev/ttyS0 2>&1
stty raw -echo
echo KVMSNAP-READY
while IFS= read -r line; do
  id=${line%% *}
  out=$(echo "${line#* }" | base64 -d | sh 2>&1)
  rc=$?
  printf '@@B %s\n%s\n@@E %s %d\n' "$id" "$out" "$id" "$rc"
done
""".replace("MODULES", " ".join(MODULES))


@dataclass(frozen=True)
class GuestImage:
    """The cached, shared parts of the test guest."""

    directory: Path
    kernel: Path
    initrd: Path
    disk_template: Path

    def disk_for(self, name: str) -> Path:
        return self.directory / f"{name}.qcow2"

    def console_for(self, name: str) -> Path:
        return self.directory / "sock" / f"{name}.sock"

    def console_log(self, name: str) -> Path:
        """Everything the guest's console printed, appended across QEMU restarts."""
        return self.directory / "console" / f"{name}.log"


def guest_dir() -> Path:
    return Path(os.environ.get("KVMSNAP_GUEST_DIR", DEFAULT_DIR))


def build_image(directory: Path | None = None) -> GuestImage:
    """Build (or reuse) the kernel, initramfs and data disk template."""
    directory = directory or guest_dir()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # QEMU runs as another user and must traverse it
    _socket_dir(directory / "sock")
    _socket_dir(directory / "console")
    kernel = directory / "vmlinuz"
    modules = directory / "modules"
    if not kernel.exists() or not modules.is_dir():
        _fetch_kernel(directory, kernel, modules)
    initrd = directory / "initrd.cpio.gz"
    if not initrd.exists():
        _make_initrd(modules, initrd)
    template = directory / "data-template.qcow2"
    if not template.exists():
        _make_data_disk(template)
    return GuestImage(directory, kernel, initrd, template)


def _run(*argv: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in argv], check=True, cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _socket_dir(path: Path) -> None:
    # QEMU (not root under qemu:///system) creates the console socket itself.
    path.mkdir(exist_ok=True)
    uid, gid = _qemu_user(path.parent)
    if uid is None:
        path.chmod(0o1777)
        return
    os.chown(path, uid, gid)
    path.chmod(0o755)


def _qemu_user(directory: Path) -> tuple[int | None, int]:
    """Who QEMU runs as for guests in ``directory``: its owner when that is not root (a
    user's qemu:///session daemon, whose guests live in the user's files), else the system
    daemon's libvirt-qemu user (None when there is none)."""
    stat = directory.stat()
    if stat.st_uid != 0:
        return stat.st_uid, stat.st_gid
    try:
        user = pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return None, 0
    return user.pw_uid, user.pw_gid


def _give_to_qemu(path: Path) -> None:
    """A disk made by root in a user's guest directory must be writable by that user's QEMU
    (the system daemon chowns disks itself; a session daemon cannot)."""
    stat = path.parent.stat()
    if stat.st_uid != 0 and os.geteuid() == 0:
        os.chown(path, stat.st_uid, stat.st_gid)


def _fetch_kernel(directory: Path, kernel: Path, modules: Path) -> None:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        work = Path(tmp)
        work.chmod(0o777)  # apt's download user writes here
        _run("apt-get", "download", KERNEL_PACKAGE, cwd=work)
        meta = next(work.glob("*.deb"))
        depends = subprocess.run(["dpkg-deb", "-f", str(meta), "Depends"], check=True,
                                 capture_output=True, text=True).stdout
        image_pkg = depends.split(",")[0].split()[0]
        _run("apt-get", "download", image_pkg, cwd=work)
        deb = next(p for p in work.glob("*.deb") if p.name.startswith(image_pkg + "_"))
        _run("dpkg-deb", "-x", deb, work / "x")
        modules.mkdir(exist_ok=True)
        for name in MODULES:
            found = glob.glob(str(work / "x" / "lib" / "modules" / "*" / "**" / f"{name}.ko*"),
                              recursive=True)
            _install_module(Path(found[0]), modules / f"{name}.ko")
        vmlinuz = next((work / "x" / "boot").glob("vmlinuz-*"))
        shutil.copyfile(vmlinuz, kernel.with_suffix(".tmp"))
        kernel.with_suffix(".tmp").rename(kernel)


def _install_module(source: Path, target: Path) -> None:
    # Newer kernel packages compress modules; busybox insmod wants them plain.
    if source.suffix == ".xz":
        target.write_bytes(lzma.decompress(source.read_bytes()))
    else:
        shutil.copyfile(source, target)


def _make_initrd(modules: Path, initrd: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("bin", "proc", "sys", "dev", "tmp", "data", "lib/modules"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        shutil.copytree(modules, root / "lib" / "modules", dirs_exist_ok=True)
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, check=True,
                              input="\n".join(files).encode(), capture_output=True).stdout
    partial = initrd.with_suffix(".tmp")
    partial.write_bytes(gzip.compress(cpio))
    partial.rename(initrd)


def _make_data_disk(template: Path, size: str = "32M") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        content = Path(tmp) / "content"
        content.mkdir()
        (content / "hello.txt").write_text("pristine data disk\n")
        raw = Path(tmp) / "data.raw"
        _run("mkfs.ext4", "-q", "-F", "-L", "kvmsnap", "-d", content, raw, size)
        partial = template.with_suffix(".tmp")
        _run("qemu-img", "convert", "-O", "qcow2", raw, partial)
        partial.rename(template)


def direct_boot_domain(name: str, domain_type: str, memory_mib: int, kernel: Path, initrd: Path, cmdline: str,
                       disk: Path) -> tuple[ET.Element, ET.Element]:
    """A one-vCPU test guest booted from ``kernel`` and ``initrd``, with ``disk`` as a virtio
    qcow2 disk, no USB and no balloon: its (domain, devices) elements, for the caller's devices.

    Every name goes in as data, escaped by ElementTree.
    """
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(kernel)
    ET.SubElement(os_, "initrd").text = str(initrd)
    ET.SubElement(os_, "cmdline").text = cmdline
    devices = ET.SubElement(dom, "devices")
    source = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(source, "driver", name="qemu", type="qcow2")
    ET.SubElement(source, "source", file=str(disk))
    ET.SubElement(source, "target", dev="vda", bus="virtio")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return dom, devices


def domain_xml(name: str, image: GuestImage, memory_mib: int = 256, domain_type: str = "qemu",
               screen: bool = False) -> str:
    """The libvirt XML of the busybox test guest: its console on a unix socket and logged
    to a file; with ``screen``, a VGA card too (for screenshots; no display is opened)."""
    dom, devices = direct_boot_domain(name, domain_type, memory_mib, image.kernel, image.initrd,
                                      "console=ttyS0 quiet panic=-1", image.disk_for(name))
    ET.SubElement(dom, "on_reboot").text = "destroy"
    serial = ET.SubElement(devices, "serial", type="unix")
    ET.SubElement(serial, "source", mode="bind", path=str(image.console_for(name)))
    ET.SubElement(serial, "log", file=str(image.console_log(name)), append="on")
    ET.SubElement(serial, "target", port="0")
    if screen:
        video = ET.SubElement(devices, "video")
        ET.SubElement(video, "model", type="vga")
    return ET.tostring(dom, encoding="unicode")


PROBE_SECONDS = 20.0  # a KVM guest that has not answered its console by then counts as hung


def domain_type(conn: libvirt.virConnect, image: GuestImage) -> str:
    """'kvm' where a short boot probe shows KVM works on this host, else 'qemu' (TCG).

    /dev/kvm can exist while guests hang (nested KVM on some hosts): only a
    guest that boots and answers proves it.  The answer is cached beside the
    images; KVMSNAP_DOMAIN_TYPE=kvm|qemu overrides it.
    """
    forced = os.environ.get("KVMSNAP_DOMAIN_TYPE")
    if forced in ("kvm", "qemu"):
        return forced
    cache = image.directory / "domain-type"
    if cache.exists():
        return cache.read_text().strip()
    found = "kvm" if Path("/dev/kvm").exists() and _kvm_boots(conn, image) else "qemu"
    cache.write_text(found + "\n")
    return found


def _kvm_boots(conn: libvirt.virConnect, image: GuestImage) -> bool:
    import libvirt

    from pytest_kvmsnap.testing.console import Console, ConsoleError

    name = "kvmsnap-kvm-probe"
    remove_guest(conn, name, image)
    shutil.copyfile(image.disk_template, image.disk_for(name))
    _give_to_qemu(image.disk_for(name))
    try:
        conn.defineXML(domain_xml(name, image, 256, domain_type="kvm")).create()
        Console(str(image.console_for(name))).wait_ready(timeout=PROBE_SECONDS)
        return True
    except (libvirt.libvirtError, ConsoleError, OSError):
        return False
    finally:
        remove_guest(conn, name, image)


def define_guest(conn: libvirt.virConnect, name: str, image: GuestImage, memory_mib: int = 256,
                 start: bool = True, screen: bool = False) -> libvirt.virDomain:
    """(Re)define guest ``name`` with a fresh data disk and, by default, start it."""
    remove_guest(conn, name, image)
    shutil.copyfile(image.disk_template, image.disk_for(name))
    _give_to_qemu(image.disk_for(name))
    dom = conn.defineXML(domain_xml(name, image, memory_mib, domain_type(conn, image), screen))
    if start:
        dom.create()
    return dom


def remove_guest(conn: libvirt.virConnect, name: str, image: GuestImage | None = None) -> None:
    """Destroy and undefine ``name`` with all its snapshots' metadata; drop its disk."""
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)  # "not found" is expected here
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        dom = None
    if dom is not None:
        if dom.isActive():
            dom.destroy()
        for snap in dom.listAllSnapshots():
            snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        dom.undefine()
    if image is not None:
        image.disk_for(name).unlink(missing_ok=True)
