"""Public fixtures: ``kvm_guest``, ``kvm_guests``, ``kvm_guest_factory``, ``kvm_ssh``, ``kvm_testinfra``,
``kvm_fabric`` and ``kvm_connection``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from pytest_kvmsnap.clients import FabricConnections, make_testinfra_host
from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guest import Guest
from pytest_kvmsnap.session import CURRENT_KEY, PREPARED_KEY, SETTINGS_KEY, coordinator_for
from pytest_kvmsnap.ssh import GuestSSH

if TYPE_CHECKING:
    import libvirt

T = TypeVar("T")


def _one_line(make: Callable[[], T]) -> T:
    """``make()``; the plugin's own error fails the test as its one line, without a traceback."""
    try:
        return make()
    except KvmSnapError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def kvm_connection(request: pytest.FixtureRequest) -> libvirt.virConnect:
    """The libvirt connection to the configured URI (one per process, closed at the end)."""
    return _one_line(lambda: coordinator_for(request.config).connection())


@pytest.fixture
def kvm_guests(request: pytest.FixtureRequest) -> Mapping[str, Guest]:
    """Read-only mapping of domain name to :class:`Guest` for all the test's guests."""
    spec = request.node.stash.get(PREPARED_KEY, None)
    assert spec is not None, "kvmsnap: the test's guests were not prepared; was the plugin disabled?"
    coordinator = coordinator_for(request.config)
    return _one_line(lambda: MappingProxyType({name: coordinator.guest(name) for name in spec.domains}))


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
        self._fabric: FabricConnections | None = None

    def ssh(self, name: str | None = None) -> GuestSSH:
        """The SSH client of guest ``name`` of the current test (its first guest without a name): one
        per guest and process, reconnected after every revert (``pytest_kvmsnap.ssh``).

        From its first use on, the plugin sets the guest's clock and reseeds it
        over this connection after each revert (readiness.py), and the test
        reuses the connection instead of opening one more.
        """
        guest = self.get(name)
        key = name or next(iter(self.all()))  # as tests name it: the original's name in clone mode
        if key not in self._ssh:
            settings = self._config.stash[SETTINGS_KEY]
            self._ssh[key] = GuestSSH(guest, settings.ssh_user, settings.ssh_key, settings.ssh_timeout)
            coordinator_for(self._config).shells[key] = self._ssh[key]
        return self._ssh[key]

    def testinfra(self, name: str | None = None) -> Any:
        """pytest-testinfra's ``Host`` for guest ``name`` of the current test (paramiko backend,
        ``--kvm-ssh-user``/``--kvm-ssh-key``); its connection is dropped after every revert."""
        settings = self._config.stash[SETTINGS_KEY]
        return _one_line(lambda: make_testinfra_host(self.get(name), settings.ssh_user, settings.ssh_key,
                                                     settings.ssh_timeout))

    def fabric(self, name: str | None = None) -> Any:
        """A fabric ``Connection`` to guest ``name`` of the current test, made anew after a revert."""
        if self._fabric is None:
            settings = self._config.stash[SETTINGS_KEY]
            self._fabric = FabricConnections(settings.ssh_user, settings.ssh_key, settings.ssh_timeout)
        connections = self._fabric
        return _one_line(lambda: connections.get(self.get(name)))

    def close(self) -> None:
        for client in self._ssh.values():
            client.close()
        if self._fabric is not None:
            self._fabric.close()

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
        coordinator = _one_line(lambda: coordinator_for(self._config))
        return _one_line(lambda: MappingProxyType({name: coordinator.guest(name) for name in spec.domains}))


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


@pytest.fixture
def kvm_testinfra(kvm_guest_factory: GuestFactory, kvm_guest: Guest) -> Any:
    """pytest-testinfra's ``Host`` for the test's first guest: ``kvm_testinfra.file(...)``,
    ``.service(...)``, ``.run(...)`` across reverts (``pytest-kvmsnap[testinfra]``)."""
    return kvm_guest_factory.testinfra()


@pytest.fixture
def kvm_fabric(kvm_guest_factory: GuestFactory, kvm_guest: Guest) -> Any:
    """A fabric ``Connection`` to the test's first guest, made anew after each revert."""
    return kvm_guest_factory.fabric()
