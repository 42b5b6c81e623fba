"""What the plugin runs inside a guest after a revert, whichever channel carries it
(the engine's guest agent, or the SSH connection ``kvm_ssh`` uses).

One guest process sets the clock and reseeds: under TCG each process the guest
starts costs 0.1-0.2 s, and the two steps used to be two processes.
"""

from __future__ import annotations

# Forces the guest kernel to mix in fresh bytes and reseed its random generator.
# ioctl numbers from linux/random.h: RNDADDENTROPY = _IOW('R', 3, int[2]), RNDRESEEDCRNG = _IO('R', 7).
RESEED_PERL = ('open(my $f, ">", "/dev/urandom") or die "open: $!"; my $d = pack("H*", $ARGV[0]); '
               'ioctl($f, 0x40085203, pack("ii", 8 * length($d), length($d)) . $d) or die "RNDADDENTROPY: $!"; '
               'ioctl($f, 0x5207, 0) or die "RNDRESEEDCRNG: $!";')

# Exit codes of settle_script(): which step failed.
CLOCK_FAILED, RESEED_FAILED, NO_PERL = 10, 11, 12


def settle_script(clock: bool, reseed: bool) -> str:
    """A POSIX shell script taking ``SECONDS HEX`` (host time, entropy as hex): sets the clock
    to SECONDS (UTC, with fractions) and forces a reseed with HEX's bytes, as asked.

    Without perl the bytes are still written to /dev/urandom (mixed in, no forced
    reseed) and the script exits NO_PERL.  Reads them from ``$1 $2``, or, with no
    arguments, prints ``ready`` and reads one line: then the time is taken when
    the guest is ready for it, not when the command was sent.
    """
    assert "'" not in RESEED_PERL, "the perl program goes between single quotes"
    steps = ['if [ $# -eq 2 ]; then t=$1 hex=$2; else echo ready; read -r t hex || exit 9; fi']
    if clock:
        steps.append(f'date -u -s "@$t" >/dev/null || exit {CLOCK_FAILED}')
    if reseed:
        steps.append("if command -v perl >/dev/null 2>&1; then "
                     f"perl -e '{RESEED_PERL}' \"$hex\" || exit {RESEED_FAILED}; "
                     f'else echo "$hex" > /dev/urandom; exit {NO_PERL}; fi')
    return "\n".join(steps) + "\n"


def partial(code: int, stderr: str) -> str:
    """Why a settle script that exited ``code`` did only part of its work."""
    if code == NO_PERL:
        return "no perl in the guest to force a reseed; fresh bytes were mixed in without it"
    step = {CLOCK_FAILED: "setting the clock", RESEED_FAILED: "the forced reseed"}.get(code, "the script")
    return f"{step} failed (exit {code}): {stderr.strip()[:300] or 'no message'}"
