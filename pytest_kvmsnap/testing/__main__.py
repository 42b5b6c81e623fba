"""``python -m pytest_kvmsnap.testing build|define|remove|run`` for the test guest."""

from __future__ import annotations

import argparse
import os
import sys
import time

from pytest_kvmsnap.testing.console import Console
from pytest_kvmsnap.testing.debian import build_debian, define_debian
from pytest_kvmsnap.testing.guest import build_image, define_guest, remove_guest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_kvmsnap.testing")
    parser.add_argument("action", choices=["build", "define", "remove", "run", "build-debian", "define-debian"])
    parser.add_argument("names", nargs="*", default=["kvmsnap-test"])
    parser.add_argument("--memory", type=int, default=256, help="MiB (default 256)")
    parser.add_argument("--uri", default=os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system"))
    parser.add_argument("--command", default="cat /data/hello.txt", help="for 'run'")
    args = parser.parse_args(argv)
    if args.action.endswith("-debian"):
        return _debian(args)
    image = build_image()
    if args.action == "build":
        print(f"guest image ready in {image.directory}")
        return 0
    import libvirt

    conn = libvirt.open(args.uri)
    for name in args.names:
        if args.action == "define":
            start = time.monotonic()
            define_guest(conn, name, image, args.memory)
            Console(str(image.console_for(name))).wait_ready()
            print(f"guest {name} ready ({args.memory} MiB) in {time.monotonic() - start:.1f} s")
        elif args.action == "remove":
            remove_guest(conn, name, image)
            print(f"guest {name} removed")
        else:
            print(Console(str(image.console_for(name))).check(args.command))
    return 0


def _debian(args: argparse.Namespace) -> int:
    """The Debian 12 guest (systemd, sshd, guest agent): build it, or define and boot it."""
    start = time.monotonic()
    image = build_debian()
    print(f"debian guest image ready in {image.directory} ({time.monotonic() - start:.0f} s)")
    if args.action == "build-debian":
        return 0
    import libvirt

    conn = libvirt.open(args.uri)
    for name in args.names:
        start = time.monotonic()
        define_debian(conn, name, image, max(args.memory, 512))
        print(f"guest {name} defined and started; ssh -i {image.ssh_key} root@<kvm_guest.address()>, "
              f"console log {image.console_log(name)} ({time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
