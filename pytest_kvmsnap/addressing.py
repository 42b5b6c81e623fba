"""Where this host reaches a port of a guest: its address, or a port QEMU forwards.

On QEMU's user-mode network a guest has no address the host can route to (its
10.0.2.x is inside QEMU), so a forward QEMU already has for the port is used
(``<qemu:commandline>`` hostfwd, whoever made it), else a free port on the
host's 127.0.0.1 is forwarded to it (``hostfwd_add``), one
per QEMU process: each clone has its own, and a new process (after a cold
revert) needs new forwards.  The forwards are kept in the run record, which
the finisher reads to remove them.  On a network the hypervisor manages, the
guest's own address as the engine sees it.  No pytest here.
"""

from __future__ import annotations

from pytest_kvmsnap.engine import Engine, Machine
from pytest_kvmsnap.exceptions import KvmSnapError
from pytest_kvmsnap.guest import GuestState


def guest_address(engine: Engine, machine: Machine, state: GuestState, name: str, port: int) -> tuple[str, int]:
    """(host, port) where this host connects to the held guest's ``port``."""
    record = state.record
    assert record is not None, "a test's guest is held"
    netdev = machine.user_network()
    if netdev is None:
        address = machine.ipv4()
        if address is None:
            raise KvmSnapError(f"guest {name!r} has no IPv4 address the hypervisor can see (no DHCP lease on "
                               "a network it manages, no guest agent, no ARP entry): put it on such a network "
                               "(NAT or bridge), or forward its port on a user-mode network")
        return address, port
    if not engine.is_this_host():
        raise KvmSnapError(f"guest {name!r} is on QEMU's user-mode network on {engine.hostname()}: a forwarded "
                           f"port would listen on that host's 127.0.0.1, which this host cannot reach. Put "
                           "the guest on a network the hypervisor manages (NAT or bridge) to test it from here.")
    identity = machine.process_identity()
    process = identity[0] if identity else -1
    forward = record.forwards.get(str(port))
    if forward is None or forward[1] != process:  # a new QEMU process has no forwards yet
        # The guest's own forward (a <qemu:commandline> hostfwd, say) is used, never removed.
        existing = machine.host_forwards().get(port)
        if existing is not None:
            return existing
        forward = [machine.forward_port(netdev, port), process]
        record.forwards[str(port)] = forward
        state.lock.write(record)
    return "127.0.0.1", forward[0]
