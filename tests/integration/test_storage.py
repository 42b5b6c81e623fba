"""Copies through libvirt's storage API on a real libvirtd: byte for byte, snapshots kept,
and robust to another run's pool over the same directory going away mid-copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_kvmsnap.libvirt import storage
from pytest_kvmsnap.ownership import Owner
from pytest_kvmsnap.testing.guest import guest_dir
from tests.integration.conftest import URI


@pytest.fixture
def image_dir() -> Iterator[Path]:
    """A directory the hypervisor's daemon can read (in the test guests' directory), with a
    small qcow2 image holding an internal snapshot and some data."""
    directory = guest_dir() / f"storage-test-{time.monotonic_ns()}"
    directory.mkdir(mode=0o755)
    owner = guest_dir().stat()  # a session daemon's user must make the copies' directory in it
    os.chown(directory, owner.st_uid, owner.st_gid)
    image = directory / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 2M", str(image)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "baseline", str(image)], check=True)
    image.chmod(0o644)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def pools_named(conn: Any, prefix: str) -> list[str]:
    return [pool.name() for pool in conn.listAllStoragePools() if pool.name().startswith(prefix)]


def test_a_copy_is_byte_for_byte_and_outlives_another_runs_pool(image_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    conn = libvirt.open(URI)
    owner = Owner("storagetest", 1, "nowhere", time.time())
    target = storage.make_pool(conn, "kvmsnap-storagetest", str(image_dir / "copies"), owner)
    # Another run's transient pool over the image's directory, as when two guests there
    # are cloned at once: it is used for the read, and goes away just before the download.
    other = conn.storagePoolCreateXML(storage._pool_xml("kvmsnap-storagetest-other", str(image_dir)), 0)
    real_copy, calls = storage.copy, []

    def copy_after_the_other_pool_went(source: Any, pool: Any, name: str) -> Any:
        calls.append(source.storagePoolLookupByVolume().name())
        if len(calls) == 1:
            other.destroy()
        return real_copy(source, pool, name)

    monkeypatch.setattr(storage, "copy", copy_after_the_other_pool_went)
    try:
        copied = storage.copy_file(conn, str(image_dir / "disk.qcow2"), target, "disk.qcow2",
                                   "kvmsnap-storagetest-read")
        assert calls == ["kvmsnap-storagetest-other", "kvmsnap-storagetest-read"], "no second attempt"
        assert Path(copied.path()).read_bytes() == (image_dir / "disk.qcow2").read_bytes()
        snapshots = subprocess.run(["qemu-img", "snapshot", "-l", "-U", copied.path()], check=True,
                                   capture_output=True, text=True).stdout
        assert "baseline" in snapshots, "the internal snapshot was lost on the way"
        assert storage.pool_owner(target) == owner
    finally:
        storage.remove_pool(target)
    assert pools_named(conn, "kvmsnap-storagetest") == []
    assert not (image_dir / "copies").exists()
