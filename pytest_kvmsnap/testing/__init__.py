"""Tools to build and drive pytest-kvmsnap's own tiny test guest.

Not imported by the plugin: these helpers exist for this project's integration
tests, its demo and its benchmarks, and for users who want a throwaway guest to
try the plugin on.  They need a Debian host (``apt-get download``, ``dpkg -x``,
``busybox-static``, ``mkfs.ext4``, ``qemu-img``).
"""

from pytest_kvmsnap.testing.console import Console, ConsoleError
from pytest_kvmsnap.testing.guest import GuestImage, build_image, define_guest, remove_guest

__all__ = ["Console", "ConsoleError", "GuestImage", "build_image", "define_guest", "remove_guest"]
