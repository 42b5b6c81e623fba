"""pytest-kvmsnap: every test gets a clean libvirt guest."""

from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guest import Guest
from pytest_kvmsnap.reuse import guest_setup

__version__ = "0.1.0"
__all__ = ["Guest", "KvmSnapError", "__version__", "guest_setup"]
