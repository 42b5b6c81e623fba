"""A realistic suite against a real guest: each test damages it on purpose.

Run with ``--kvm-domain=<guest>`` (scripts/demo.sh does it).  ``sh`` runs shell
commands in the guest over its serial console (pytest-kvmsnap's test guest); in
your own suite this would be SSH, Ansible or the guest agent.
"""

import pytest

from pytest_kvmsnap.testing import Console
from pytest_kvmsnap.testing.guest import guest_dir


@pytest.fixture
def sh(kvm_guest):
    console = Console(str(guest_dir() / "sock" / f"{kvm_guest.name}.sock"))
    console.wait_ready()
    return console
