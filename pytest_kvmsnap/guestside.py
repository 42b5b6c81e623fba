"""What the plugin runs inside a guest after a revert, whichever channel carries it
(the engine's guest agent, or the SSH connection ``kvm_ssh`` uses).

One guest process sets the clock and reseeds: under TCG each process the guest
starts costs 0.1-0.2 s.  That process is perl (every Debian, Fedora or Ubuntu
guest has it) doing both by system call; a POSIX shell script with ``date`` is
the fallback for guests without perl.
"""

from __future__ import annotations

import shlex

# Exit codes of the settle programs: which step failed.
CLOCK_FAILED, RESEED_FAILED, NO_PERL = 10, 11, 12

# Forces the guest kernel to mix in the bytes of ``$hex`` and reseed its random generator.
# ioctl numbers from linux/random.h: RNDADDENTROPY = _IOW('R', 3, int[2]), RNDRESEEDCRNG = _IO('R', 7).
_RESEED = (f'open(my $f, ">", "/dev/urandom") or do {{ print STDERR "open: $!\\n"; exit {RESEED_FAILED} }}; '
           'my $d = pack("H*", $hex); '
           'ioctl($f, 0x40085203, pack("ii", 8 * length($d), length($d)) . $d) '
           f'or do {{ print STDERR "RNDADDENTROPY: $!\\n"; exit {RESEED_FAILED} }}; '
           f'ioctl($f, 0x5207, 0) or do {{ print STDERR "RNDRESEEDCRNG: $!\\n"; exit {RESEED_FAILED} }};')
# The same alone, its bytes as its argument (the shell script's step, and the agent's step-by-step one).
RESEED_PERL = "my $hex = $ARGV[0]; " + _RESEED

# Reads ``SECONDS HEX`` from its arguments or, with none, prints ``ready`` and reads
# them from a line: then the time is taken when the guest is ready for it.
_READ_PERL = ('$| = 1; my ($t, $hex) = @ARGV; if (!defined $hex) { print "ready\\n"; '
              'defined(my $l = <STDIN>) or exit 9; ($t, $hex) = split " ", $l; }')

# clock_settime(CLOCK_REALTIME) by its system call number, found from perl's own ELF
# header (e_machine of a 64-bit binary; a module such as POSIX or Config would double
# perl's start under TCG, measured 0.5 and 0.3 s against 0.2); ``date`` elsewhere.
_CLOCK_PERL = ('my %nr = (62 => 227, 183 => 112, 243 => 112, 22 => 259, 21 => 247); my $h = ""; '
               'my $e; open($e, "<", "/proc/self/exe") and read($e, $h, 20); $h .= "\\0" x 20; '
               'my ($class, $order) = unpack("x4 C C", $h); '
               'my $nr = $class == 2 ? $nr{unpack($order == 2 ? "x18 n" : "x18 v", $h)} : undef; '
               'my $s = int($t); my $ok = defined $nr '
               '? syscall($nr, 0, pack("q q", $s, int(($t - $s) * 1e9))) == 0 '
               ': system("date", "-u", "-s", "\\@$t") == 0; '
               f'$ok or do {{ print STDERR "clock_settime: $!\\n"; exit {CLOCK_FAILED} }};')


def settle_perl(clock: bool, reseed: bool) -> str:
    """The perl program (for ``perl -e``) that sets the clock and/or forces a reseed, as asked."""
    return " ".join([_READ_PERL, *([_CLOCK_PERL] if clock else []), *([_RESEED] if reseed else [])])


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


def settle_command(clock: bool, reseed: bool) -> str:
    """One shell command line for a login shell: perl in place of the shell where the guest
    has it (one process), else the shell script; both print ``ready`` and read one line."""
    perl = shlex.quote(settle_perl(clock, reseed))
    return (f"command -v perl >/dev/null 2>&1 && exec perl -e {perl} || "
            f"exec sh -c {shlex.quote(settle_script(clock, reseed))}")


def partial(code: int, stderr: str) -> str:
    """Why a settle program that exited ``code`` did only part of its work."""
    if code == NO_PERL:
        return "no perl in the guest to force a reseed; fresh bytes were mixed in without it"
    step = {CLOCK_FAILED: "setting the clock", RESEED_FAILED: "the forced reseed"}.get(code, "the script")
    return f"{step} failed (exit {code}): {stderr.strip()[:300] or 'no message'}"
