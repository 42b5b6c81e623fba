"""The libvirt engine: everything pytest-kvmsnap asks of libvirt, through its Python API only.

One module per operation of ``engine.py``'s interface, like libvirt's own tree
keeps one directory per driver: ``connection`` (connections, errors, lookups),
``snapshots``, ``qemu`` (the process, its monitor, the in-place revert), ``agent``,
``network``, ``evidence``, ``preflight``, ``leases``, ``storage``, ``clones`` and
``advice`` (the virsh commands messages advise).  Each holds its part of the
engine's classes: ``machine`` joins the guest's parts into ``LibvirtMachine``, and
``engine`` is one connection with its guests, leases and clones; there is no layer
that only passes calls on.  Nothing outside this package imports libvirt, except
``hypervisor.py`` naming the default engine.

libvirt is imported lazily (``connection.lib``), so that ``pytest --help`` and
suites that never use a guest work without it.  Names (domains, snapshots) are
data: they reach libvirt as API arguments or as escaped XML text, and QEMU's
monitor only after a strict character check (``qemu.HMP_SAFE``).  No pytest here.
"""
