"""Public fixtures: ``kvm_guest``, ``kvm_guests``, ``kvm_guest_factory``, ``kvm_ssh`` and ``kvm_connection``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import pytest

from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guest import Guest
from pytest_kvmsnap.session import CURRENT_KEY, PREPARED_KEY, SETTINGS_KEY, coordinator_for
from pytest_kvmsnap.ssh import GuestSSH

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


class GuestFactory:
    """The guests of the marked test being set up or run now, for fixtures of any scope.

    Like pytest's ``tmp_path_factory`` beside ``tmp_path``: a session-scoped
    companion of the function-scoped ``kvm_guest``, so that a session, package,
    module or class fixture asks for it without a ScopeMismatch.  Such a fixture
    sets up inside the setup of the first test that needs it, after the plugin
    prepared that test's guests (and before its layer is checkpointed).
    """

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._ssh: dict[str, GuestSSH] = {}

    def ssh(self, name: str | None = None) -> GuestSSH:
        """The SSH client of guest ``name`` of the current test (its first guest without a name): one
        per guest and process, reconnected after every revert (``pytest_kvmsnap.ssh``)."""
        guest = self.get(name)
        key = name or next(iter(self.all()))
        if key not in self._ssh:
            settings = self._config.stash[SETTINGS_KEY]
            self._ssh[key] = GuestSSH(guest, settings.ssh_user, settings.ssh_key, settings.ssh_timeout)
        return self._ssh[key]

    def close(self) -> None:
        for client in self._ssh.values():
            client.close()

    def get(self, name: str | None = None) -> Guest:
        """Guest ``name`` of the current test; without a name, its first guest (as ``kvm_guest``)."""
        guests = self.all()
        if name is None:
            return next(iter(guests.values()))
        if name not in guests:
            pytest.fail(f"kvmsnap: kvm_guest_factory.get({name!r}): not a guest of the test being set up "
                        f"(its guests: {', '.join(guests)}); add it to the test's kvm_snapshot marker",
                        pytrace=False)
        return guests[name]

    def all(self) -> Mapping[str, Guest]:
        """Read-only mapping of domain name (as marked) to :class:`Guest` for the current test."""
        item = self._config.stash.get(CURRENT_KEY, None)
        spec = item.stash.get(PREPARED_KEY, None) if item is not None else None
        if spec is None:
            pytest.fail("kvmsnap: kvm_guest_factory was used outside a test marked kvm_snapshot (from a "
                        "fixture that an unmarked test requested?): no guest is prepared for it", pytrace=False)
        try:
            coordinator = coordinator_for(self._config)
            return MappingProxyType({name: coordinator.guest(name) for name in spec.domains})
        except KvmSnapError as exc:
            pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def kvm_guest_factory(request: pytest.FixtureRequest) -> Iterator[GuestFactory]:
    """The guests of the marked test being set up, for fixtures of any scope (see :class:`GuestFactory`)."""
    factory = GuestFactory(request.config)
    yield factory
    factory.close()


@pytest.fixture
def kvm_ssh(kvm_guest_factory: GuestFactory, kvm_guest: Guest) -> GuestSSH:
    """Commands and files over SSH on the test's first guest: ``run(command)``, ``put``, ``get``.

    One connection per guest and process, reused while the guest is not
    reverted and opened again after every revert; ``--kvm-ssh-user``,
    ``--kvm-ssh-key``, ``--kvm-ssh-timeout``.  Wider fixtures use
    ``kvm_guest_factory.ssh()``, the same client.
    """
    return kvm_guest_factory.ssh()
