"""The plugin's decisions, tested directly: no pytest-in-pytest, no hypervisor.

When a unit's edge reverts (``units.py``) and whether a revert may be an
in-place ``loadvm`` (``revert.py``, against a fake guest).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pytest_kvmsnap.revert import why_not_inplace
from pytest_kvmsnap.units import reverts_at_end, reverts_at_start

BASE = "kvmsnap-run"


@pytest.mark.parametrize(("mode", "clean_at", "owed", "reverts"), [
    # clean at the unit's baseline: nothing to do, whatever the mode or debt
    ("before", BASE, False, False),
    ("after", BASE, True, False),
    # dirty: only the modes that revert before a unit do
    ("before", None, False, True),
    ("both", None, False, True),
    ("after", None, False, False),
    ("on-failure", None, False, False),
    ("never", None, False, False),
    # dirty with a revert owed (a holder died, or its end revert failed): always
    ("after", None, True, True),
    ("never", None, True, True),
    ("on-failure", None, True, True),
    # clean at another snapshot (an earlier unit's snapshot=): always moved
    ("after", "user-snap", False, True),
    ("never", "user-snap", False, True),
])
def test_reverts_at_start(mode: str, clean_at: str | None, owed: bool, reverts: bool) -> None:
    assert reverts_at_start(mode, clean_at, BASE, owed=owed) is reverts


@pytest.mark.parametrize(("mode", "failed", "forced", "reverts"), [
    ("after", False, False, True),
    ("both", False, False, True),
    ("before", False, False, False),
    ("never", False, False, False),
    ("on-failure", False, False, False),
    ("on-failure", True, False, True),
    ("never", True, False, False),
    # the guest went down during a test: restored whatever the mode
    ("never", False, True, True),
    ("before", False, True, True),
])
def test_reverts_at_end(mode: str, failed: bool, forced: bool, reverts: bool) -> None:
    assert reverts_at_end(mode, failed=failed, forced=forced) is reverts


@dataclass
class FakeGuest:
    """A guest as the method choice sees it: no libvirt behind it."""

    monitor: str | None = None  # why QEMU's monitor cannot be asked, if it cannot
    state: str = "running"  # the state the snapshot recorded
    process: tuple[int, str] | None = (7, "devices")  # the QEMU process running it now

    def monitor_problem(self, snapshot: str) -> str | None:
        return self.monitor

    def snapshot_state(self, snapshot: str) -> str:
        return self.state

    def process_identity(self) -> tuple[int, str] | None:
        return self.process


SAME = [7, "devices"]  # the process that took or loaded the snapshot


@pytest.mark.parametrize(("setting", "guest", "loaded_by", "why"), [
    ("auto", FakeGuest(), SAME, None),
    ("inplace", FakeGuest(), SAME, None),
    ("restart", FakeGuest(), SAME, "chosen by kvm_revert_method"),
    ("auto", FakeGuest(monitor="the TEST driver has no QEMU monitor"), SAME, "the TEST driver has no QEMU monitor"),
    ("auto", FakeGuest(state="shutoff"), SAME, f"snapshot {BASE!r} was taken while the guest was not running"),
    ("auto", FakeGuest(state="paused"), SAME, f"snapshot {BASE!r} was taken while the guest was not running"),
    ("auto", FakeGuest(), None, f"this QEMU process has not taken or loaded {BASE!r}"),
    ("auto", FakeGuest(process=(8, "devices")), SAME,
     "QEMU was restarted or its devices changed since the snapshot was loaded"),
    ("auto", FakeGuest(process=(7, "hotplugged")), SAME,
     "QEMU was restarted or its devices changed since the snapshot was loaded"),
    ("auto", FakeGuest(process=None), SAME, "QEMU was restarted or its devices changed since the snapshot was loaded"),
])
def test_why_not_inplace(setting: str, guest: FakeGuest, loaded_by: list[object] | None, why: str | None) -> None:
    assert why_not_inplace(setting, guest, BASE, loaded_by) == why


def test_the_device_hash_ignores_the_agent_channels_connection_state() -> None:
    """Not hotplug: the agent connecting after a revert must not make loadvm look unsafe."""
    import xml.etree.ElementTree as ET

    from pytest_kvmsnap.libvirt.qemu import device_hash

    xml = ("<domain><devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' "
           "state='{}'/></channel><disk type='file'/></devices></domain>")
    assert device_hash(ET.fromstring(xml.format("disconnected"))) == device_hash(ET.fromstring(xml.format("connected")))
    assert device_hash(ET.fromstring(xml.format("connected"))) != device_hash(
        ET.fromstring(xml.format("connected").replace("<disk type='file'/>", "")))


def test_qemus_own_forwards_are_read_from_info_usernet() -> None:
    """What QEMU 7.2 printed for a guest (a connection and the forward), and a second network
    from <qemu:commandline> whose forward binds any address."""
    from pytest_kvmsnap.libvirt.network import parse_usernet

    text = ("Hub -1 (hostnet0):\r\n"
            "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
            "  TCP[ESTABLISHED]   87       127.0.0.1 41631       10.0.2.15    22     0   240\r\n"
            "  TCP[HOST_FORWARD]  86       127.0.0.1 41631       10.0.2.15    22     0     0\r\n"
            "Hub -1 (n0):\r\n"
            "  TCP[HOST_FORWARD]  12               * 18080       10.0.2.15    80     0     0\r\n"
            "  UDP[HOST_FORWARD]  13               *  5353       10.0.2.15    53     0     0\r\n")
    assert parse_usernet(text) == (["hostnet0", "n0"], {22: ("127.0.0.1", 41631), 80: ("127.0.0.1", 18080)})
    assert parse_usernet("") == ([], {})
