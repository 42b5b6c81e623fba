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

# Ends a one-shot program: the message on stderr, the step's exit code.  The resident
# program (below) defines its own ``fail``, which answers the host and goes on.
_FAIL_EXIT = 'sub fail { print STDERR "$_[1]\\n"; exit $_[0] } '

# Forces the guest kernel to mix in the bytes of ``$hex`` and reseed its random generator.
# ioctl numbers from linux/random.h: RNDADDENTROPY = _IOW('R', 3, int[2]), RNDRESEEDCRNG = _IO('R', 7).
_RESEED = (f'open(my $f, ">", "/dev/urandom") or fail({RESEED_FAILED}, "open: $!"); '
           'my $d = pack("H*", $hex); '
           'ioctl($f, 0x40085203, pack("ii", 8 * length($d), length($d)) . $d) '
           f'or fail({RESEED_FAILED}, "RNDADDENTROPY: $!"); '
           f'ioctl($f, 0x5207, 0) or fail({RESEED_FAILED}, "RNDRESEEDCRNG: $!");')
# The same alone, its bytes as its argument (the shell script's step, and the agent's step-by-step one).
RESEED_PERL = _FAIL_EXIT + "my $hex = $ARGV[0]; " + _RESEED

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
               f'$ok or fail({CLOCK_FAILED}, "clock_settime: $!");')


# The resident settle program (resident.py).  Started through the agent before the run's
# baseline, with a token as its first input line: it listens on a loopback port, prints
# ``PORT PID`` and leaves a daemon, so every revert restores it.  The host sends one line
# ``TOKEN SECONDS HEX STEPS`` (STEPS: c = clock, r = reseed) as soon as it connects (no
# greeting to wait for: a round trip costs tens of ms on a guest that just came back) and
# reads ``ok``, ``fail CODE WHY`` or ``denied``; ``TOKEN quit`` stops it.  A line is
# read for at most 10 s (a stuck client never blocks it), and it exits by itself after
# IDLE seconds without a connection: a killed run's restored guest does not keep it.  It
# first stops any earlier one (a killed run's, brought back when its baseline was restored).
RESIDENT_IDLE = 600
RESIDENT_NAME = "kvmsnap-settle"  # what ps shows
RESIDENT_PERL = (
    'use Socket; use POSIX (); sub fail { die [$_[0], $_[1]] } '
    'for my $comm (glob "/proc/[0-9]*/comm") { open(my $h, "<", $comm) or next; my $n = <$h>; '
    f'kill("TERM", $1) if defined $n && $n eq "{RESIDENT_NAME}\\n" && $comm =~ m{{^/proc/(\\d+)/}} }} '
    'my $token = <STDIN>; defined $token or exit 20; chomp $token; '
    'my $s; socket($s, PF_INET, SOCK_STREAM, 0) and bind($s, pack_sockaddr_in(0, INADDR_LOOPBACK)) '
    'and listen($s, 4) or exit 20; my ($port) = unpack_sockaddr_in(getsockname($s)); '
    'defined(my $pid = fork()) or exit 21; if ($pid) { print "$port $pid\n"; exit 0 } '
    'POSIX::setsid(); open(STDIN, "<", "/dev/null"); open(STDOUT, ">", "/dev/null"); '
    f'open(STDERR, ">", "/dev/null"); $0 = "{RESIDENT_NAME}"; '
    'my $all = ""; vec($all, fileno($s), 1) = 1; '
    f'while (1) {{ my $n = select(my $r = $all, undef, undef, {RESIDENT_IDLE}); last if $n == 0; next if $n < 0; '
    'accept(my $c, $s) or next; my $one = ""; vec($one, fileno($c), 1) = 1; '
    'my $l = ""; while ($l !~ /\n/ && select(my $w = $one, undef, undef, 10) > 0) '
    '{ sysread($c, $l, 4096, length $l) or last } '
    'my ($tok, $t, $hex, $steps) = split " ", $l; '
    'if (!defined $tok || $tok ne $token) { syswrite($c, "denied\n"); close($c); next } '
    'if ($t eq "quit") { syswrite($c, "bye\n"); exit 0 } '
    f'my $done = eval {{ if ($steps =~ /c/) {{ {_CLOCK_PERL} }} if ($steps =~ /r/) {{ {_RESEED} }} 1 }}; '
    'syswrite($c, $done ? "ok\n" : ref $@ ? "fail $@->[0] $@->[1]\n" : "fail 1 $@"); close($c); }')


# Asks the resident process on port ``$ARGV[0]`` to quit, the line read from its input
# (``TOKEN quit``: the token never in an argument list that ps shows); exit 0 if it did.
RESIDENT_QUIT_PERL = ('use Socket; my $line = <STDIN>; my $s; socket($s, PF_INET, SOCK_STREAM, 0) and '
                      'connect($s, pack_sockaddr_in($ARGV[0], INADDR_LOOPBACK)) or exit 1; '
                      'syswrite($s, $line); my $r = <$s>; exit(defined $r && $r eq "bye\n" ? 0 : 2)')


def settle_perl(clock: bool, reseed: bool) -> str:
    """The perl program (for ``perl -e``) that sets the clock and/or forces a reseed, as asked."""
    return " ".join([_FAIL_EXIT, _READ_PERL, *([_CLOCK_PERL] if clock else []), *([_RESEED] if reseed else [])])


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
