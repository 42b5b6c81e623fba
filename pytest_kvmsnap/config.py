"""Settings: one name in three places, one resolver, one frozen result.

Every setting ``x`` is ``--kvm-x`` on the command line, ``kvm_x`` in the ini
file and, where it makes sense per test, ``x=`` on the ``kvm_snapshot`` marker.
Precedence, highest first: marker > command line > ini file > environment
(``LIBVIRT_DEFAULT_URI`` for the URI) > built-in default.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_kvmsnap.exceptions import ConfigError

if TYPE_CHECKING:  # the pytest glue passes these in; this module needs no pytest to import
    import pytest

REVERT_MODES = ("after", "before", "both", "on-failure", "never")
SCOPES = ("function", "class", "module", "package", "session")
REVERT_METHODS = ("auto", "restart", "inplace")
# Spellings users typed before a rename (0.x rule, README "Compatibility"): still accepted, with a
# deprecation warning naming the new one, until the next minor release.
RENAMED_CHOICES = {"revert_method": {"libvirt": "restart"}}
AGENT_STEPS = ("auto", "on", "off")  # auto: on when the guest's agent answers
DEFAULT_URI = "qemu:///system"
MIN_LEASE_EXPIRY = 8.0  # seconds: renewals every 2 s at the least
HOST_ID_VARIABLE = "KVMSNAP_HOST_ID"


def this_host() -> str:
    """The name this host gives itself in ownership records and leases.

    The hostname, unless ``$KVMSNAP_HOST_ID`` says otherwise: CI runners in
    containers may share one hostname, and two identities on one machine are how
    the tests play two hosts.
    """
    return os.environ.get(HOST_ID_VARIABLE) or socket.gethostname()


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: Any = None
    choices: tuple[str, ...] | None = None
    ini_type: str = "string"
    multiple: bool = False
    flag: bool = False
    ini: bool = True
    cli: str | None = None  # the command-line spelling, when it differs (--kvm-domain)

    @property
    def accepted(self) -> tuple[str, ...] | None:
        """What the command line accepts: the choices and their old spellings."""
        old = tuple(RENAMED_CHOICES.get(self.name, {}))
        return self.choices + old if self.choices else None

    @property
    def dest(self) -> str:
        return f"kvm_{self.name}"

    @property
    def option(self) -> str:
        return "--kvm-" + (self.cli or self.name).replace("_", "-")


SETTINGS = (
    Setting("uri", "libvirt connection URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system); repeatable: "
            "hypervisors that each have the guests form a pool, and each run (each xdist worker) uses them "
            "on one that has them free; one that cannot be reached is skipped.",
            ini_type="linelist", multiple=True),
    Setting("domains", "guest(s) used by kvm_snapshot markers that name none; repeatable.",
            default=(), ini_type="linelist", multiple=True, cli="domain"),
    Setting("revert", "when a guest goes back to its baseline: after/before/both each unit, "
            "on-failure (only after a unit with a failed test) or never (only at session end). "
            "Default: after.", default="after", choices=REVERT_MODES),
    Setting("scope", "the unit of isolation: tests of one function/class/module/package/session "
            "share the guest's state. Default: function.", default="function", choices=SCOPES),
    Setting("snapshot", "an existing snapshot tests start from instead of the state found at "
            "session start; never deleted."),
    Setting("revert_method", "how to revert a running guest: inplace (load the snapshot into the running "
            "VM process, fast), restart (the engine's own revert: a new VM process from the snapshot; "
            "'libvirt' is its old name) or auto (inplace where safe). "
            "Default: auto.", default="auto", choices=REVERT_METHODS),
    Setting("lock_timeout", "seconds to wait for a guest another run or worker holds; 0 = do not "
            "wait. Default: 600.", default=600.0),
    Setting("lease_expiry", "seconds a run's lease on a guest lasts on the hypervisor unless renewed; the run "
            "renews it every quarter of that while it lives, and a run on another host may take the guest "
            "over once it expired (a dead CI runner). Hosts' clocks must agree within a quarter of it. "
            "Default: 120.", default=120.0),
    Setting("connect_timeout", "seconds to wait for a hypervisor to answer a new connection; one that does "
            "not (a host that is down or drops packets, where TCP and SSH would wait minutes) counts as "
            "unreachable, and a pool skips it. Default: 20.", default=20.0),
    Setting("lock_dir", "directory for guest locks and run records; may be shared by several users "
            "(default: $XDG_RUNTIME_DIR/pytest-kvmsnap, else /tmp/pytest-kvmsnap-<uid>)."),
    Setting("clones", "give each xdist worker its own clone of each guest, started at the baseline "
            "(memory too), instead of taking turns: auto = one per worker, N = N clones shared "
            "round-robin, 0 = off. The original is not used by tests. Default: 0.", default="0"),
    Setting("keep_snapshot", "keep the run's own baseline snapshot after the session.",
            default=False, flag=True, ini=False),
    Setting("wait", "after the baseline and after each revert, wait until the guest is ready before the "
            "next test: agent (the guest agent answers guest-ping), tcp:PORT (a connection to the "
            "guest's PORT succeeds), ssh (an SSH banner is read from port 22), hook (your "
            "pytest_kvmsnap_ready(guest) returns). Default: no wait.", default=""),
    Setting("wait_timeout", "seconds --kvm-wait may take before the test errors. Default: 120.", default=120.0),
    Setting("sync_clock", "after a revert, set the guest's clock from the host's (over kvm_ssh's connection "
            "once a test used it on the guest, else the guest agent) and reset QEMU's RTC reinjection: on, "
            "off, or auto (on when one of those answers). Default: auto.", default="auto", choices=AGENT_STEPS),
    Setting("reseed", "after a revert, mix fresh host randomness into the guest's entropy pool and force "
            "its random generator to reseed (as the clock): on, off, or auto. Default: auto.",
            default="auto", choices=AGENT_STEPS),
    Setting("resident", "for a guest whose tests ask for kvm_ssh, start one small process in it before the "
            "baseline, which sets the clock and reseeds over kvm_ssh's connection after each revert without "
            "starting a process (ps shows kvmsnap-settle, with a port on 127.0.0.1): auto, or off (one settle "
            "process per revert instead). Default: auto.", default="auto", choices=("auto", "off")),
    Setting("keep_failed", "when a test fails, save its guests' state (memory and disk) as a snapshot kept "
            "for you before any revert: the summary says how to look at it and delete it. Default: off.",
            default=False, flag=True, ini_type="bool"),
    Setting("keep_failed_max", "at most this many failed states kept per guest and run (each holds the "
            "guest's memory on its disk). Default: 3.", default=3),
    Setting("console_lines", "for a failed test, show the last N lines its guests wrote to their serial "
            "console during it (from the console's log file); 0 = none. Default: 50.", default=50),
    Setting("artifacts", "directory for a failed test's evidence files (console log, screenshot of a guest "
            "with a screen); default: kvmsnap-artifacts beside the --junitxml file, else none."),
    Setting("address", "where this host reaches a guest, instead of asking the hypervisor: NAME=HOST (each "
            "port of guest NAME at HOST) or NAME=HOST:PORT (its SSH port 22 at HOST:PORT, a forward of "
            "yours); once per guest (ini: a line each). Default: the hypervisor's view.", multiple=True,
            ini_type="linelist"),
    Setting("ssh_user", "the user kvm_ssh logs in as. Default: root.", default="root"),
    Setting("ssh_key", "the private key kvm_ssh logs in with; default: your default keys and ssh-agent."),
    Setting("ssh_timeout", "seconds each kvm_ssh step may take (connect, handshake, login, a command unless "
            "given its own). Default: 30.", default=30.0),
)
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Wait:
    """``--kvm-wait``, parsed once: what "ready" means after a baseline or a revert (readiness.py)."""

    kind: str = ""  # "" (no wait), "agent", "ssh", "hook" or "tcp"
    port: int = 0  # the guest port "ssh" and "tcp" connect to

    def __str__(self) -> str:
        """The setting's own spelling (``tcp:8080``), as the summary names the step."""
        return f"tcp:{self.port}" if self.kind == "tcp" else self.kind

    def __bool__(self) -> bool:
        return bool(self.kind)


def parse_wait(value: object) -> Wait:
    text = str(value).strip()
    if text in ("", "agent", "hook"):
        return Wait(text)
    if text == "ssh":
        return Wait("ssh", 22)
    kind, _, port = text.partition(":")
    if kind == "tcp" and _digits(port) and 1 <= int(port) <= 65535:
        return Wait("tcp", int(port))
    raise ConfigError(f"kvm_wait = {value!r} is not one of agent, ssh, hook, tcp:PORT (a port from 1 to 65535)")


@dataclass(frozen=True)
class NamedAddress:
    """``--kvm-address NAME=HOST[:PORT]``, parsed once: where the user says a guest is reached."""

    host: str
    ssh_port: int = 0  # HOST:PORT given: where the guest's port 22 is; 0: every port at HOST

    def reach(self, name: str, port: int) -> tuple[str, int]:
        if not self.ssh_port:
            return self.host, port
        if port != 22:
            raise ConfigError(f"kvm_address names only where the SSH port of guest {name!r} is ({self.host}:"
                              f"{self.ssh_port}), not its port {port}: name the host alone (NAME=HOST) if "
                              "every port is reached there")
        return self.host, self.ssh_port


def parse_addresses(lines: object) -> tuple[tuple[str, NamedAddress], ...]:
    """``NAME=HOST``, ``NAME=HOST:PORT``, ``NAME=[IPv6]:PORT``; one clear line for anything else."""
    named: dict[str, NamedAddress] = {}
    if isinstance(lines, str):
        lines = lines.splitlines()
    if lines is not None and not isinstance(lines, list | tuple):
        raise ConfigError(f"kvm_address = {lines!r} is not NAME=HOST or NAME=HOST:PORT lines")
    for line in lines or ():
        name, _, where = str(line).strip().partition("=")
        parsed = _host_port(where)
        if not name or any(c.isspace() for c in name) or parsed is None:
            raise ConfigError(f"kvm_address = {line!r} is not NAME=HOST or NAME=HOST:PORT (a port from 1 to 65535)")
        if name in named:
            raise ConfigError(f"kvm_address names guest {name!r} twice")
        named[name] = NamedAddress(*parsed)
    return tuple(named.items())


def _host_port(where: str) -> tuple[str, int] | None:
    """HOST (port 0: every port), HOST:PORT or [IPv6]:PORT; None if it is none of them."""
    host, port = where, None
    if where.startswith("["):
        host, colon, port = where[1:].partition("]:")
        if not colon:
            return None
    elif where.count(":") == 1:  # more than one: an IPv6 address alone
        host, port = where.split(":")
    if not host or any(c.isspace() for c in where):
        return None
    if port is None:
        return host, 0
    return (host, int(port)) if _digits(port) and 1 <= int(port) <= 65535 else None


@dataclass(frozen=True)
class Settings:
    """The run-wide settings after command line, ini and environment were merged."""

    uri: str = DEFAULT_URI  # the first of ``uris``
    uris: tuple[str, ...] = ()  # every hypervisor of the pool, in the order given; () = just ``uri``
    domains: tuple[str, ...] = ()
    revert: str = "after"
    scope: str = "function"
    snapshot: str | None = None
    revert_method: str = "auto"
    lock_timeout: float = 600.0
    lease_expiry: float = 120.0
    connect_timeout: float = 20.0
    lock_dir: str | None = None
    clones: str = "0"
    keep_snapshot: bool = False
    wait: Wait = Wait()
    wait_timeout: float = 120.0
    sync_clock: str = "auto"
    reseed: str = "auto"
    resident: str = "auto"
    keep_failed: bool = False
    keep_failed_max: int = 3
    console_lines: int = 50
    artifacts: str | None = None
    addresses: tuple[tuple[str, NamedAddress], ...] = ()  # --kvm-address: (guest name, where)
    ssh_user: str = "root"
    ssh_key: str | None = None
    ssh_timeout: float = 30.0
    deprecated: tuple[str, ...] = ()  # one line per old spelling used (RENAMED_CHOICES)

    @property
    def pool(self) -> tuple[str, ...]:
        """The hypervisors to use, in the order given."""
        return self.uris or (self.uri,)

    def named_address(self, name: str) -> NamedAddress | None:
        """Where the user said guest ``name`` is reached (--kvm-address), if they did."""
        return dict(self.addresses).get(name)

    def clone_count(self, workers: int) -> int:
        """How many clones per guest for a run with ``workers`` processes (0 = off)."""
        return workers if self.clones == "auto" else int(self.clones)


@dataclass(frozen=True)
class Spec:
    """What one test needs: which guests, when to revert, its unit and baseline.

    Made from the test's ``kvm_snapshot`` marker and the settings (markers.py).
    """

    domains: tuple[str, ...]
    revert: str
    scope: str
    snapshot: str | None


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmsnap", "clean libvirt guests per test (pytest-kvmsnap)")
    for s in SETTINGS:
        if s.flag:
            group.addoption(s.option, action="store_true", dest=s.dest, default=None, help=s.help)
        else:
            group.addoption(s.option, dest=s.dest, default=None, choices=s.accepted,
                            action="append" if s.multiple else "store", metavar=(s.cli or s.name).upper(),
                            help=s.help)
        if s.ini:
            parser.addini(s.dest, s.help, type=s.ini_type, default=None)  # type: ignore[arg-type]


def resolve(config: pytest.Config, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    values = {s.name: _value(config, s) for s in SETTINGS}
    uris = tuple(dict.fromkeys(str(uri) for uri in values["uri"] or () if uri))
    uris = uris or (env.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI,)
    values["uri"], values["uris"] = uris[0], uris
    values["domains"] = tuple(values["domains"] or ())
    for name, value in list(values.items()):
        if value is None:
            values[name] = BY_NAME[name].default
    values["deprecated"] = _renamed(values)
    values["lock_timeout"] = _seconds("kvm_lock_timeout", values["lock_timeout"])
    values["wait_timeout"] = _seconds("kvm_wait_timeout", values["wait_timeout"])
    values["lease_expiry"] = _seconds("kvm_lease_expiry", values["lease_expiry"])
    values["connect_timeout"] = _seconds("kvm_connect_timeout", values["connect_timeout"])
    values["ssh_timeout"] = _seconds("kvm_ssh_timeout", values["ssh_timeout"])
    if not values["ssh_timeout"]:
        raise ConfigError("kvm_ssh_timeout = 0: no SSH step is that fast; give it seconds (default 30)")
    if not values["connect_timeout"]:
        raise ConfigError("kvm_connect_timeout = 0: no hypervisor answers that fast; give it seconds (default 20)")
    if values["lease_expiry"] < MIN_LEASE_EXPIRY:
        raise ConfigError(f"kvm_lease_expiry = {values['lease_expiry']:g} is too short: a run renews its lease "
                          f"every quarter of it; use {MIN_LEASE_EXPIRY:g} s or more")
    values["wait"] = parse_wait(values["wait"])
    values["keep_failed"] = values["keep_failed"] in (True, "true", "1", "yes", "on")
    values["keep_failed_max"] = _count("kvm_keep_failed_max", values["keep_failed_max"])
    values["console_lines"] = _count("kvm_console_lines", values["console_lines"])
    values["clones"] = _clones(values["clones"])
    values["addresses"] = parse_addresses(values.pop("address"))
    if values["clones"] != "0" and values["addresses"]:
        raise ConfigError("kvm_address and kvm_clones do not go together: every clone of a guest starts from "
                          "its memory, so one address cannot reach them apart. Drop kvm_address; the plugin "
                          "finds each clone's address or forwards a port to it.")
    if values["clones"] != "0" and values["snapshot"]:
        raise ConfigError("kvm_clones and kvm_snapshot do not go together: clones start from the "
                          "state each guest is found in. Drop one of them.")
    return validate(Settings(**values), source="ini file")


def _renamed(values: dict[str, Any]) -> tuple[str, ...]:
    """Old spellings replaced by their new ones in ``values``; a deprecation line for each."""
    lines = []
    for name, renames in RENAMED_CHOICES.items():
        new = renames.get(str(values[name]))
        if new is not None:
            lines.append(f"kvm_{name} = {values[name]!r} is deprecated: it is now called {new!r} "
                         "(same behaviour); the old name goes in the next minor release")
            values[name] = new
    return tuple(lines)


def _seconds(name: str, value: object) -> float:
    try:
        seconds = float(str(value))
    except ValueError:
        raise ConfigError(f"{name} = {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds):  # nan passes every comparison below; inf never ends a wait
        raise ConfigError(f"{name} = {value!r} is not a finite number of seconds")
    if seconds < 0:
        raise ConfigError(f"{name} = {value!r} must be 0 or more")
    return seconds


def _count(name: str, value: object) -> int:
    text = str(value).strip()
    if not _digits(text):
        raise ConfigError(f"{name} = {value!r} is not a whole number (0 or more)")
    return int(text)


def _clones(value: object) -> str:
    text = str(value).strip().lower()
    if text == "auto" or (_digits(text) and int(text) >= 0):
        return str(int(text)) if _digits(text) else text
    raise ConfigError(f"kvm_clones = {value!r} is not 'auto' or a number of clones (0 = off)")


def _value(config: pytest.Config, s: Setting) -> Any:
    cli = config.getoption(s.dest)
    if cli is not None:
        return cli
    if not s.ini:
        return None
    ini = config.getini(s.dest)
    return ini if ini not in (None, "", []) else None


def validate(settings: Settings, source: str) -> Settings:
    for s in SETTINGS:
        value = getattr(settings, s.name, None)
        if s.choices and value not in s.choices:
            raise ConfigError(
                f"{source}: {s.dest} = {value!r} is not one of {', '.join(s.choices)}"
            )
    return settings


def _digits(text: str) -> bool:
    """Only 0-9: str.isdigit() also takes '²' and other digits int() refuses (found by hypothesis)."""
    return text.isascii() and text.isdigit()
