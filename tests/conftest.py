"""Shared helpers: a guest in libvirt's in-process test driver, and a revert log."""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

TEST_URI = "test:///default"

# Inner test runs load this conftest to log every revert the plugin reports.
RECORDER = """
import json, os

def pytest_kvmsnap_reverted(config, domain, snapshot, seconds, method, reason):
    with open(os.environ["KVMSNAP_REVERT_LOG"], "a") as f:
        f.write(json.dumps({"domain": domain, "snapshot": snapshot, "method": method,
                            "reason": reason}) + "\\n")

def pytest_kvmsnap_baseline(config, domain, snapshot, seconds):
    with open(os.environ["KVMSNAP_REVERT_LOG"], "a") as f:
        f.write(json.dumps({"domain": domain, "baseline": snapshot}) + "\\n")
"""


class RevertLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def reasons(self, domain: str | None = None) -> list[str]:
        return [e["reason"] for e in self.entries()
                if "reason" in e and (domain is None or e["domain"] == domain)]


@pytest.fixture
def revert_log(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> RevertLog:
    path = pytester.path / "reverts.jsonl"
    monkeypatch.setenv("KVMSNAP_REVERT_LOG", str(path))
    pytester.makeconftest(RECORDER)
    return RevertLog(path)


def guest_domain_xml(name: str, disk_format: str = "qcow2", pflash: bool = False, extra: str = "") -> str:
    dom = ET.Element("domain", type="test")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory").text = "65536"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type").text = "hvm"
    if pflash:
        ET.SubElement(os_, "loader", readonly="yes", type="pflash").text = "/usr/share/OVMF/OVMF_CODE.fd"
    devices = ET.SubElement(dom, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=disk_format)
    ET.SubElement(disk, "source", file=f"/guest/{uuid.uuid4().hex}.img")
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if extra:  # raw device XML, for devices the preflight must refuse
        devices.append(ET.fromstring(extra))
    return ET.tostring(dom, encoding="unicode")


class TestDriver:
    """Defines throwaway domains in libvirt's in-process ``test:///default``.

    Its state is per process, so only in-process ``pytester.runpytest`` runs see
    these domains; they are for the plugin's logic, not proof on a real guest.
    """

    __test__ = False

    def __init__(self) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda *_: None, None)
        self.conn = libvirt.open(TEST_URI)
        self.names: list[str] = []

    def define(self, name: str | None = None, start: bool = True, **kw: object) -> str:
        name = name or f"unit-{uuid.uuid4().hex[:8]}"
        dom = self.conn.defineXML(guest_domain_xml(name, **kw))  # type: ignore[arg-type]
        if start:
            dom.create()
        self.names.append(name)
        return name

    def snapshots(self, name: str) -> list[str]:
        return sorted(self.conn.lookupByName(name).snapshotListNames())

    def cleanup(self) -> None:
        for name in self.names:
            dom = self.conn.lookupByName(name)
            for snap in dom.listAllSnapshots():
                snap.delete(0)
            if dom.isActive():
                dom.destroy()
            dom.undefine()


@pytest.fixture
def testdriver() -> Iterator[TestDriver]:
    driver = TestDriver()
    yield driver
    driver.cleanup()
