"""pytest-kvmsnap: every test gets a clean libvirt guest."""

from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guest import Guest

__version__ = "0.1.0"
__all__ = ["Guest", "KvmSnapError", "__version__"]
