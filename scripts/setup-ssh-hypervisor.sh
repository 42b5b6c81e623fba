#!/usr/bin/env bash
# A second, real hypervisor reached over real SSH, for the remote-host tests:
# an unprivileged user's own libvirtd (qemu:///session, started on demand by
# libvirt's virt-ssh-helper), reached as qemu+ssh://USER@127.0.0.1/session with
# a key made for the test.  Its guests run as that user, with their files in
# the user's home; the system libvirtd never sees them.
#
# Idempotent; as root.  Installs openssh-server, creates the user (default
# kvmsnap-remote) with ~/images for its guests, the key
# (/root/.ssh/kvmsnap-remote), and starts sshd on 127.0.0.1 when nothing runs
# it.  Prints the URI on its last line.
set -euo pipefail

say() { printf 'setup-ssh: %s\n' "$*" >&2; }

USER_NAME="${KVMSNAP_SSH_USER:-kvmsnap-remote}"
KEY=/root/.ssh/kvmsnap-remote

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root; try: sudo $0"
    exit 1
fi

if ! dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -q "install ok installed"; then
    say "installing openssh-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null
fi

if ! id "$USER_NAME" >/dev/null 2>&1; then
    say "creating user $USER_NAME"
    useradd --create-home --shell /bin/sh "$USER_NAME"
fi
HOME_DIR="$(getent passwd "$USER_NAME" | cut -d: -f6)"
chmod 755 "$HOME_DIR"  # the tests (root) read its guests' consoles
# Its guests' files: the test guest's image is built here (KVMSNAP_GUEST_DIR).
install -d -m 755 -o "$USER_NAME" -g "$USER_NAME" "$HOME_DIR/images"

mkdir -p /root/.ssh && chmod 700 /root/.ssh
if [ ! -f "$KEY" ]; then
    say "making the test key $KEY"
    ssh-keygen -q -t ed25519 -N '' -C kvmsnap-test -f "$KEY"
fi
install -d -m 700 -o "$USER_NAME" -g "$USER_NAME" "$HOME_DIR/.ssh"
if ! grep -qF "$(cat "$KEY.pub")" "$HOME_DIR/.ssh/authorized_keys" 2>/dev/null; then
    say "authorizing the key for $USER_NAME"
    cat "$KEY.pub" >> "$HOME_DIR/.ssh/authorized_keys"
fi
chown "$USER_NAME:" "$HOME_DIR/.ssh/authorized_keys" && chmod 600 "$HOME_DIR/.ssh/authorized_keys"

if ! pgrep -x sshd >/dev/null 2>&1; then
    mkdir -p /run/sshd
    ssh-keygen -A >/dev/null
    say "starting sshd on 127.0.0.1:22"
    /usr/sbin/sshd -o ListenAddress=127.0.0.1
fi

# libvirt's ssh transport checks the host key: record it for root.
if ! ssh-keygen -F 127.0.0.1 >/dev/null 2>&1; then
    ssh-keyscan -T 10 -t ed25519 127.0.0.1 2>/dev/null >> /root/.ssh/known_hosts
fi

URI="qemu+ssh://$USER_NAME@127.0.0.1/session?keyfile=$KEY"
for _ in $(seq 1 25); do
    if virsh -c "$URI" version >/dev/null 2>&1; then
        say "the session daemon of $USER_NAME answers over SSH"
        echo "$URI"
        exit 0
    fi
    sleep 0.4
done
say "no answer from $URI:"
virsh -c "$URI" version >&2 || true
exit 1
