#!/usr/bin/env bash
# Prepare a Debian 12 host to run pytest-kvmsnap's real-guest tests.
#
# Idempotent: installs the packages, creates the directories libvirtd expects,
# starts virtlogd/libvirtd when no init system runs them (containers, CI), and
# opens /dev/kvm to the kvm group when the device exists.  Every change it makes
# is echoed.  Set KVMSNAP_LIBVIRT_TCP=1 to also listen on 127.0.0.1:16509
# (qemu+tcp, auth none, loopback only) for the remote-URI tests.
set -euo pipefail

say() { printf 'setup-host: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (it installs packages and starts libvirtd); try: sudo $0" >&2
    exit 1
fi

# mmdebstrap and openssh-client build the Debian test guest (root disk, SSH key).
PACKAGES=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils libvirt-dev
          pkg-config gcc python3-dev python3-venv busybox-static cpio e2fsprogs
          mmdebstrap openssh-client)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "packages already installed"
fi

# The test guest's kernel comes from `apt-get download`, which needs package
# lists even when every package above was already installed.
if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    say "fetching package lists (apt-get update)"
    apt-get update -qq
fi

for d in /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/images; do
    [ -d "$d" ] || { say "creating $d"; mkdir -p "$d"; }
done

if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    if [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ]; then
        say "giving group kvm access to /dev/kvm"
        chgrp kvm /dev/kvm && chmod 660 /dev/kvm
    fi
fi

# A previous session's daemons were killed without cleanup: their pid files and
# sockets are stale, which is normal here.  Start a daemon only if none answers.
# Zombies (a daemon killed but not yet reaped) do not count.
# Root's daemons only: a user's session libvirtd/virtlogd (the SSH hypervisor of
# scripts/setup-ssh-hypervisor.sh) has the same name and must not count.
alive() { pgrep -x -u root -r D,R,S "$1" >/dev/null 2>&1; }

if ! alive virtlogd; then
    rm -f /var/run/libvirt/virtlogd.pid /var/run/libvirt/virtlogd-sock /var/run/libvirt/virtlogd-admin-sock
    say "starting virtlogd"
    virtlogd -d
fi

LIBVIRTD_ARGS=(-d)
if [ "${KVMSNAP_LIBVIRT_TCP:-0}" = 1 ]; then
    conf=/etc/libvirt/libvirtd-kvmsnap-tcp.conf
    if [ ! -f "$conf" ]; then
        say "writing $conf (TCP on 127.0.0.1 only, auth none)"
        cat /etc/libvirt/libvirtd.conf > "$conf"
        printf '%s\n' 'listen_tls = 0' 'listen_tcp = 1' 'listen_addr = "127.0.0.1"' 'auth_tcp = "none"' >> "$conf"
    fi
    LIBVIRTD_ARGS=(-d --listen -f "$conf")
fi

# A daemon that runs but does not listen on TCP, when TCP is asked for: restart
# it with --listen (running guests survive a libvirtd restart).
if [ "${KVMSNAP_LIBVIRT_TCP:-0}" = 1 ] && alive libvirtd \
        && ! virsh -c qemu+tcp://127.0.0.1/system version >/dev/null 2>&1; then
    say "restarting libvirtd to listen on TCP"
    pkill -x -u root libvirtd
    for _ in $(seq 1 50); do alive libvirtd || break; sleep 0.2; done
fi

if ! alive libvirtd; then
    rm -f /var/run/libvirt/libvirtd.pid /var/run/libvirt/libvirt-sock /var/run/libvirt/libvirt-sock-ro \
          /var/run/libvirt/libvirt-admin-sock
    say "starting libvirtd ${LIBVIRTD_ARGS[*]}"
    libvirtd "${LIBVIRTD_ARGS[@]}"
fi

for _ in $(seq 1 50); do
    if virsh -c qemu:///system version >/dev/null 2>&1; then
        say "libvirtd answers on qemu:///system"
        exit 0
    fi
    sleep 0.2
done
say "libvirtd did not answer on qemu:///system within 10 s; see /var/log/libvirt/" >&2
exit 1
