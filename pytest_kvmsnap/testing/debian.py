"""A real distribution to test on: Debian 12 with systemd, sshd and the QEMU guest agent.

Built from Debian's archive only (``mmdebstrap``) into a cached qcow2 root
disk, booted with the kernel and initramfs Debian installed in it.  It reaches
the host over QEMU's user-mode network: no bridge, no dnsmasq, no firewall
rules, which starts the same in a container and in CI.  A host port is
forwarded to its sshd on demand (``Guest.address``).  Root logs in with a key
made for these tests; the guest agent listens on libvirt's agent channel.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_kvmsnap.testing.guest import _socket_dir, direct_boot_domain, guest_dir

if TYPE_CHECKING:
    import libvirt

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ["systemd-sysv", "udev", "dbus", "openssh-server", "qemu-guest-agent", "linux-image-cloud-amd64",
            "initramfs-tools", "ifupdown", "iproute2", "kmod", "procps"]
# systemd units a test guest has no use for, masked so that boot is shorter.
MASKED = ["apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
          "man-db.timer", "dpkg-db-backup.timer", "systemd-timesyncd.service", "getty@tty1.service"]
# User-mode networking: QEMU is the guest's gateway; the address is fixed, no DHCP wait.
NETWORK = """auto lo
iface lo inet loopback

auto eth0
iface eth0 inet static
    address 10.0.2.15/24
    gateway 10.0.2.2
"""


@dataclass(frozen=True)
class DebianImage:
    directory: Path
    kernel: Path
    initrd: Path
    disk_template: Path
    ssh_key: Path  # private key root's authorized_keys accepts

    def disk_for(self, name: str) -> Path:
        return self.directory / f"{name}.qcow2"

    def console_log(self, name: str) -> Path:
        return self.directory / "console" / f"{name}.log"


def build_debian(directory: Path | None = None) -> DebianImage:
    """Build (or reuse) the Debian root disk, its kernel and initramfs, and the SSH key."""
    directory = (directory or guest_dir()) / "debian"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # QEMU runs as another user and must traverse it
    _socket_dir(directory / "console")
    image = DebianImage(directory, directory / "vmlinuz", directory / "initrd.img",
                        directory / "root-template.qcow2", directory / "id_ed25519")
    if not image.ssh_key.exists():
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pytest-kvmsnap test key", "-f", image.ssh_key)
    if not image.disk_template.exists():
        _build_root(image)
    return image


def _run(*argv: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(a) for a in argv], check=True, cwd=cwd, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def _build_root(image: DebianImage) -> None:
    with tempfile.TemporaryDirectory(dir=image.directory) as tmp:
        work = Path(tmp)
        root = work / "root"
        _run("mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
             "--aptopt=Acquire::Retries \"3\"", SUITE, root, f"deb {MIRROR} {SUITE} main")
        _configure(root, image.ssh_key.with_suffix(".pub").read_text())
        # The kernel and initramfs Debian installed: the guest is booted with them directly.
        shutil.copyfile(next((root / "boot").glob("vmlinuz-*")), image.kernel)
        shutil.copyfile(next((root / "boot").glob("initrd.img-*")), image.initrd)
        raw = work / "root.raw"
        _run("mkfs.ext4", "-q", "-F", "-L", "root", "-d", root, raw, "2G")
        partial = work / "root.qcow2"
        _run("qemu-img", "convert", "-O", "qcow2", raw, partial)
        partial.rename(image.disk_template)


def _configure(root: Path, public_key: str) -> None:
    (root / "etc/hostname").write_text("kvmsnap-debian\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 kvmsnap-debian\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    (root / "etc/network/interfaces").write_text(NETWORK)
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(public_key)
    (ssh / "authorized_keys").chmod(0o600)
    # No reverse DNS lookups of the client: user-mode networking has no answer for them.
    (root / "etc/ssh/sshd_config.d/kvmsnap.conf").write_text("UseDNS no\nPermitRootLogin prohibit-password\n")
    for unit in MASKED:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def domain_xml(name: str, image: DebianImage, memory_mib: int = 512, domain_type: str = "qemu",
               ssh_forward: int | None = None) -> str:
    """The libvirt XML of a Debian test guest: a user-mode network, the agent channel, and
    its serial console into a file.

    With ``ssh_forward`` the network is given as many users give it, in
    ``<qemu:commandline>`` with sshd forwarded to that port of 127.0.0.1:
    libvirt then knows nothing of it, only QEMU does.
    """
    # tsc=unstable: under TCG a TSC that happened to calibrate at boot follows the host's
    # clock across loadvm, so whether a restored clock is stale would depend on the
    # boot; without it the guest keeps time on jiffies, which a loadvm rewinds -- as
    # KVM guests' kvm-clock is rewound, the case users meet (see readiness.py).
    dom, devices = direct_boot_domain(name, domain_type, memory_mib, image.kernel, image.initrd,
                                      "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet tsc=unstable",
                                      image.disk_for(name))
    if ssh_forward is None:
        interface = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(interface, "model", type="virtio")
    else:
        ET.register_namespace("qemu", QEMU_NS)
        commandline = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in ("-netdev", f"user,id=usernet0,hostfwd=tcp:127.0.0.1:{int(ssh_forward)}-:22",
                    "-device", "virtio-net-pci,netdev=usernet0,addr=0x1e"):  # a slot libvirt leaves free
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind")  # libvirt picks the socket's path
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(image.console_log(name)))
    ET.SubElement(serial, "target", port="0")
    return ET.tostring(dom, encoding="unicode")


def define_debian(conn: libvirt.virConnect, name: str, image: DebianImage, memory_mib: int = 512,
                  start: bool = True, ssh_forward: int | None = None) -> libvirt.virDomain:
    """(Re)define Debian guest ``name`` on a fresh copy of the root disk and, by default, start it."""
    from pytest_kvmsnap.testing.guest import build_image, domain_type, remove_guest

    remove_guest(conn, name)
    image.disk_for(name).unlink(missing_ok=True)
    _run("cp", "--reflink=auto", "--sparse=always", image.disk_template, image.disk_for(name))
    kind = domain_type(conn, build_image())  # the busybox guest's boot probe decides
    dom = conn.defineXML(domain_xml(name, image, memory_mib, kind, ssh_forward))
    if start:
        dom.create()
    return dom


def wait_until_settled(dom: libvirt.virDomain, timeout: float = 300.0) -> None:
    """Until systemd has finished booting the guest (``systemctl is-system-running --wait``).

    Take baselines from a settled guest: one taken while boot jobs still run
    replays that work after every revert (measured: SSH tests cost 7 s each
    instead of 0.6 s).
    """
    import time

    from pytest_kvmsnap.libvirt import agent
    from pytest_kvmsnap.libvirt.machine import LibvirtMachine
    from pytest_kvmsnap.readiness import poll

    if not poll(LibvirtMachine(dom).agent_answers, time.monotonic() + timeout, every=0.5):
        raise TimeoutError(f"the guest agent of {dom.name()!r} did not answer within {timeout:.0f} s")
    agent.agent_exec(dom, "/bin/systemctl", ["is-system-running", "--wait"], timeout=timeout)
