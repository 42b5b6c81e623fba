"""Public fixtures: ``kvm_guest``, ``kvm_guests`` and ``kvm_connection``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import pytest

from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guest import Guest
from pytest_kvmsnap.session import PREPARED_KEY, coordinator_for

if TYPE_CHECKING:
    import libvirt


@pytest.fixture(scope="session")
def kvm_connection(request: pytest.FixtureRequest) -> libvirt.virConnect:
    """The libvirt connection to the configured URI (one per process, closed at the end)."""
    try:
        return coordinator_for(request.config).connection()
    except KvmSnapError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def kvm_guests(request: pytest.FixtureRequest) -> Mapping[str, Guest]:
    """Read-only mapping of domain name to :class:`Guest` for all the test's guests."""
    spec = request.node.stash.get(PREPARED_KEY, None)
    assert spec is not None, "kvmsnap: the test's guests were not prepared; was the plugin disabled?"
    coordinator = coordinator_for(request.config)
    try:
        return MappingProxyType({name: coordinator.guest(name) for name in spec.domains})
    except KvmSnapError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def kvm_guest(kvm_guests: Mapping[str, Guest]) -> Guest:
    """The test's first guest: the marker's first domain, else the first --kvm-domain."""
    return next(iter(kvm_guests.values()))
