"""snsbus configuration: one TOML file, environment overrides, command-line flags on top.

Every setting of the three daemons and of ``bus-ctl`` is a key of :data:`SCHEMA`,
in the section of its role (``[manager]``, ``[node]``, ``[frontend]``, ``[ctl]``).
A key is named like the daemon's flag (``--max-children`` is ``max_children``).
A value comes from, lowest first:

1. the default in :data:`SCHEMA` (the flag's documented default);
2. the file ``snsbus.toml`` (see :func:`find_file` for where it is looked for);
3. the environment: ``SNSBUS_<SECTION>_<KEY>`` (``SNSBUS_NODE_JOIN``), plus the
   older variables some keys already had (``SNSBUS_STATE_DIR``...), below it
   (except ``SNSBUS_ENDPOINT``, which bus-ctl's ``--endpoint`` reads itself, so it wins);
4. the flag given on the command line.

A file with an unknown section or key, or a value of the wrong type, is refused
with an error naming the file and the key; so is a bad environment value,
naming the variable.  Unknown ``SNSBUS_*`` variables are left alone (deployed
processes get ``SNSBUS_NODE_ID`` and friends).

The daemons get layers 1-3 through :func:`daemon_options`, which turns them
into click's ``default_map`` before any other option is read; click applies
the flags.  ``bus-ctl config show`` and ``--print-config`` render the result
with where each value came from.

This module is imported by ``bus-node`` at start: it reads no file at import
and imports ``tomllib`` only when there is a file to parse.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import click

from core.errors import BusError

__all__ = [
    "ROLES",
    "SCHEMA",
    "Key",
    "Value",
    "Config",
    "ConfigError",
    "ConfigCliError",
    "FILE_NAME",
    "ENV_FILE",
    "find_file",
    "read_file",
    "load",
    "env_name",
    "default",
    "example_toml",
    "render",
    "as_json",
    "daemon_options",
    "effective",
]

FILE_NAME = "snsbus.toml"
ENV_FILE = "SNSBUS_CONFIG"
ROLES = ("manager", "node", "frontend", "ctl")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("human", "json")


class Key(NamedTuple):
    """One setting: its type, default (None: unset) and one line of help."""

    name: str
    type: type  # str, int, float, bool or list (of strings)
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    aliases: tuple[str, ...] = ()  # older environment variables, below SNSBUS_<SECTION>_<KEY>
    example: Any = None  # shown in examples/snsbus.toml for a key unset by default
    path: bool = False  # a file or directory: a leading ~ is expanded
    alias_wins: bool = False  # the command reads its alias itself, above every default (click's envvar)


def _logging(role: str) -> tuple[Key, ...]:
    return (
        Key("log_level", str, "INFO", f"{role} log level", choices=LOG_LEVELS),
        Key("log_format", str, "human", "human: one readable line per record; json: one JSON object per line "
                                         "(time, level, logger, message, pid, role, exc)", choices=LOG_FORMATS),
    )


SCHEMA: dict[str, tuple[Key, ...]] = {
    "manager": (
        Key("control", str, "tcp://127.0.0.1:7070", "control endpoint to bind (nodes and bus-ctl connect here)"),
        Key("data", str, "tcp://127.0.0.1:0", "data endpoint to bind (packages; port 0: any free port)"),
        Key("state_dir", str, None, "directory for manager.json, application records and the package cache; "
                                    "unset: no applications", example="/var/lib/snsbus/manager", path=True),
        Key("max_children", int, 16, "children a tree node accepts before redirecting joins", min=1, max=100000),
        Key("policy", str, "randtree", "tree placement policy", choices=("randtree", "balanced", "star")),
        Key("heartbeat", float, 1.0, "seconds between heartbeats on every tree link", min=0.001),
        Key("misses", int, 3, "silent heartbeats before a peer is declared dead", min=1, max=100),
        Key("xmlrpc", str, None, "[HOST:]PORT of the XML-RPC API; unset: off", example="127.0.0.1:7072"),
        Key("xmlrpc_allow_remote", bool, False, "let the XML-RPC API bind a non-loopback address "
                                                "(needs xmlrpc_token_file)"),
        Key("xmlrpc_token_file", str, None, "file holding the XML-RPC token (HTTP basic auth password); "
                                            "unset: no token", example="/etc/snsbus/xmlrpc.token", path=True),
        Key("monitor_port", int, None, "serve the web monitor and /metrics on this port (0: any); unset: off",
            example=7080, min=0, max=65535),
        Key("monitor_host", str, "127.0.0.1", "monitor address; a non-loopback one needs monitor_token_file"),
        Key("monitor_token_file", str, None, "file with the token monitor readers send (?token= or "
                                             "Authorization: Bearer); unset: loopback only",
            example="/etc/snsbus/monitor.token", path=True),
        Key("monitor_frontend", list, [], "front ends (http://HOST:PORT) whose /stats the monitor polls, besides "
                                          "those that subscribe to the manager's beacons"),
        Key("alert_command", str, None, "shell command run per alert: the alert as JSON on stdin, SNSBUS_ALERT_* "
                                        "in its environment; unset: none", example="/usr/local/bin/page-oncall"),
        Key("alert_webhook", str, None, "URL each alert is POSTed to as JSON; unset: none",
            example="http://alerts.example.org/hook"),
        Key("alert_lost_percent", float, 20.0, "alert when the tree loses more than this share of its nodes",
            min=0.001, max=100),
        Key("keys", str, None, "CurveZMQ key store (manager key, accepted/pending/revoked keys); unset: "
                               "STATE_DIR/keys, else ~/.snsbus/manager/keys (created on first start)",
            example="/var/lib/snsbus/manager/keys", path=True),
        Key("open", bool, False, "accept every new key as it shows up (development only; revoked keys stay out)"),
        Key("insecure", bool, False, "no CurveZMQ: plain TCP on both planes (every node must agree)",
            aliases=("SNSBUS_INSECURE",)),
        *_logging("manager"),
    ),
    "node": (
        Key("join", str, None, "the manager's control endpoint, tcp://HOST:PORT (required)",
            example="tcp://manager.example.org:7070"),
        Key("name", str, None, "node name; unset: the host name (NAME-0.. with virtual > 1)",
            example="web-1"),
        Key("virtual", int, 1, "logical nodes hosted by this process", min=1, max=100000),
        Key("group", str, None, "resource group (sets the attribute group=G)", example="web"),
        Key("attr", list, [], "free-form attributes, KEY=VALUE each"),
        Key("bind_host", str, None, "address to bind; unset: 127.0.0.1 when joining loopback, else 0.0.0.0",
            example="0.0.0.0"),
        Key("advertise", str, None, "address other nodes use to reach this one; unset: the bind address "
                                    "(the host name when binding 0.0.0.0)", example="web-1.example.org"),
        Key("join_timeout", float, 0.0, "give up (exit 3) if not joined after this many seconds; 0: never", min=0),
        Key("state_dir", str, None, "where applications live; unset: ~/.snsbus/node", aliases=("SNSBUS_NODE_DIR",),
            example="/var/lib/snsbus/node", path=True),
        Key("key_dir", str, None, "this node's CurveZMQ keys (identity.key, made on first start; manager.pub; "
                                  "the last keyring); unset: STATE_DIR/keys", example="/var/lib/snsbus/node/keys",
            path=True),
        Key("manager_key", str, None, "the manager's public key to pin (z85 text or a .pub file); unset: "
                                      "KEY_DIR/manager.pub", example="/etc/snsbus/manager.pub"),
        Key("insecure", bool, False, "no CurveZMQ: plain TCP on both planes (the manager must agree)",
            aliases=("SNSBUS_INSECURE",)),
        *_logging("bus-node"),
    ),
    "frontend": (
        Key("manager", str, None, "the manager's control endpoint (required)",
            example="tcp://manager.example.org:7070"),
        Key("service", str, "transend", "the service whose beacons to follow"),
        Key("host", str, "127.0.0.1", "address the HTTP server listens on"),
        Key("port", int, 8080, "HTTP port (0: any)", min=0, max=65535),
        Key("profiles", str, None, "SQLite profile database; unset: every user gets the defaults",
            example="/var/lib/snsbus/profiles.db", path=True),
        Key("origins", list, [], "origins images may be fetched from (scheme://host:port)"),
        Key("timeout", float, 3.0, "seconds a request may wait for workers before the answer turns approximate",
            min=0.01),
        Key("attempt_timeout", float, None, "seconds to wait for one worker before re-dispatching; "
                                            "unset: half of timeout", min=0.01, example=1.5),
        Key("attempts", int, 3, "workers tried per request", min=1, max=32),
        Key("max_queue", int, 32, "queue + in-flight at which a worker counts as full", min=1),
        Key("fetch_timeout", float, 10.0, "seconds for fetching one original from its origin", min=0.01),
        Key("max_original", int, None, "largest original in bytes; unset: the bus's frame limit (8 MiB)", min=1,
            example=4194304),
        Key("access_log", bool, False, "log every HTTP request"),
        Key("key_dir", str, None, "this front end's CurveZMQ keys; unset: the key dir of the bus-node that "
                                  "runs it, else ~/.snsbus/frontend/keys", aliases=("SNSBUS_KEY_DIR",),
            example="/var/lib/snsbus/frontend/keys", path=True),
        Key("manager_key", str, None, "the manager's public key to pin (z85 text or a .pub file); unset: "
                                      "the bus-node's, else KEY_DIR/manager.pub", aliases=("SNSBUS_MANAGER_KEY",),
            example="/etc/snsbus/manager.pub"),
        Key("insecure", bool, False, "no CurveZMQ: plain TCP (the manager must agree)", aliases=("SNSBUS_INSECURE",)),
        *_logging("frontend"),
    ),
    "ctl": (
        Key("endpoint", str, None, "control endpoint of a manager bus-ctl did not start; unset: the state "
                                   "directory's manager.json", aliases=("SNSBUS_ENDPOINT",),
            example="tcp://manager.example.org:7070", alias_wins=True),
        Key("state_dir", str, None, "bus-ctl's state directory; unset: ~/.local/state/snsbus",
            aliases=("SNSBUS_STATE_DIR",), example="~/.local/state/snsbus", path=True),
    ),
}

_KEYS = {role: {k.name: k for k in keys} for role, keys in SCHEMA.items()}


class ConfigError(BusError, ValueError):
    """A configuration file or variable that cannot be used; the message names the file (or variable) and key."""


class Value(NamedTuple):
    """An effective value and where it came from: ``source`` is default, file, env or flag;
    ``origin`` the file path, the variable name or the flag (None for a default)."""

    value: Any
    source: str
    origin: str | None = None

    def where(self) -> str:
        return self.source if self.origin is None else f"{self.source} {self.origin}"


class Config(NamedTuple):
    """The configuration of every role: ``roles[role][key]`` is a :class:`Value`."""

    file: Path | None
    how: str  # how the file was found (--config, $SNSBUS_CONFIG, ./snsbus.toml, ...) or where none was
    roles: dict[str, dict[str, Value]]


def env_name(role: str, key: str) -> str:
    """``SNSBUS_<SECTION>_<KEY>``, e.g. ``SNSBUS_MANAGER_MAX_CHILDREN``."""
    return f"SNSBUS_{role.upper()}_{key.upper()}"


def default(role: str, key: str) -> Any:
    value = _KEYS[role][key].default
    return list(value) if isinstance(value, list) else value


# ------------------------------------------------------------------------ finding the file


def _user_file(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "snsbus" / FILE_NAME


def find_file(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """The configuration file to read and how it was found.

    ``path`` (``--config``), else ``$SNSBUS_CONFIG``, else ``./snsbus.toml``,
    else ``$XDG_CONFIG_HOME/snsbus/snsbus.toml`` (``~/.config/...``), else none.
    A file named by ``--config`` or ``$SNSBUS_CONFIG`` must exist; an empty
    ``$SNSBUS_CONFIG`` means "no file" (and stops the search).
    """
    env = os.environ if env is None else env
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"configuration file {p} (--config) does not exist; fix the path or drop --config")
        return p, "--config"
    named = env.get(ENV_FILE)
    if named is not None:
        if not named:
            return None, f"${ENV_FILE} is empty"
        p = Path(named).expanduser()
        if not p.is_file():
            raise ConfigError(f"configuration file {p} (${ENV_FILE}) does not exist; fix ${ENV_FILE} or unset it")
        return p, f"${ENV_FILE}"
    local = Path(cwd or os.getcwd()) / FILE_NAME
    if local.is_file():
        return local, f"./{FILE_NAME}"
    user = _user_file(env)
    if user.is_file():
        return user, str(user).replace(os.path.expanduser("~"), "~", 1)
    return None, f"looked for ./{FILE_NAME} and {_user_file(env)}"


# ------------------------------------------------------------------------ checking values


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list of strings"}[t]


def _check(key: Key, value: Any, where: str) -> Any:
    """``value`` as the key's type, or :class:`ConfigError` naming ``where``."""
    t = key.type
    ok = (isinstance(value, str) if t is str else
          isinstance(value, bool) if t is bool else
          isinstance(value, int) and not isinstance(value, bool) if t is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
          isinstance(value, list) and all(isinstance(v, str) for v in value))
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(t)}, got {type(value).__name__} {value!r}")
    if t is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if key.choices:
        canon = {c.lower(): c for c in key.choices}
        if value.lower() not in canon:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(key.choices)}")
        value = canon[value.lower()]
    if key.min is not None and value < key.min or key.max is not None and value > key.max:
        bounds = (f"between {key.min:g} and {key.max:g}" if key.min is not None and key.max is not None
                  else f"at least {key.min:g}" if key.min is not None else f"at most {key.max:g}")
        raise ConfigError(f"{where}: {value!r} is out of range; it must be {bounds}")
    if key.path:
        value = os.path.expanduser(value)
    return list(value) if t is list else value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _from_env(key: Key, text: str, var: str) -> Any:
    where = f"environment variable {var}"
    t = key.type
    if t is str:
        value: Any = text
    elif t is list:
        value = [v.strip() for v in text.split(",") if v.strip()]
    elif t is bool:
        if text.strip().lower() not in _TRUE + _FALSE:
            raise ConfigError(f"{where}: expected one of {', '.join(_TRUE + _FALSE)}, got {text!r}")
        value = text.strip().lower() in _TRUE
    else:
        try:
            value = t(text.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected {_type_name(t)}, got {text!r}") from None
    return _check(key, value, where)


def _unknown(name: str, known, what: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return f"unknown {what} {name!r}; {hint}"


def read_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Parse and check a configuration file: ``{role: {key: value}}`` for the keys it sets."""
    import tomllib

    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the configuration file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    out: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if section not in _KEYS:
            raise ConfigError(f"{path}: {_unknown(section, ROLES, 'section')}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}]), got {type(table).__name__}")
        for name, value in table.items():
            key = _KEYS[section].get(name)
            if key is None:
                raise ConfigError(f"{path}: [{section}] {_unknown(name, _KEYS[section], 'key')}")
            out.setdefault(section, {})[name] = _check(key, value, f"{path}: [{section}] {name}")
    return out


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
         cwd: str | os.PathLike | None = None) -> Config:
    """Defaults, then the file, then the environment, for every role (flags come later, from click)."""
    env = os.environ if env is None else env
    file, how = find_file(path, env, cwd)
    from_file = read_file(file) if file is not None else {}
    roles: dict[str, dict[str, Value]] = {}
    for role, keys in SCHEMA.items():
        values = {}
        for key in keys:
            v = Value(default(role, key.name), "default")
            if key.name in from_file.get(role, {}):
                v = Value(from_file[role][key.name], "file", str(file))
            canonical = env_name(role, key.name)
            order = (canonical, *key.aliases) if key.alias_wins else (*reversed(key.aliases), canonical)
            for var in order:  # the last one set wins
                if var in env:
                    v = Value(_from_env(key, env[var], var), "env", var)
            values[key.name] = v
        roles[role] = values
    return Config(file, how, roles)


# ------------------------------------------------------------------------ rendering


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def example_toml() -> str:
    """``examples/snsbus.toml``: every key with its default, commented out."""
    lines = [
        "# snsbus configuration: every key with its default, commented out.",
        "# Looked for in: --config PATH, $SNSBUS_CONFIG, ./snsbus.toml, ~/.config/snsbus/snsbus.toml.",
        "# Environment variables SNSBUS_<SECTION>_<KEY> override the file; command-line flags override both.",
        "# `bus-ctl config show` prints the effective values and where each one came from.",
    ]
    for role, keys in SCHEMA.items():
        lines += ["", f"[{role}]"]
        for key in keys:
            lines.append(f"# {key.help}")
            if key.default is None:
                lines.append(f"# {key.name} = {_toml(key.example)}  # default: unset; an example value")
            else:
                lines.append(f"# {key.name} = {_toml(key.default)}")
    return "\n".join(lines) + "\n"


def render(config: Config, roles=ROLES) -> str:
    """The effective configuration as text: one line per key with its source."""
    if config.file is None:
        lines = [f"config file: none ({config.how})"]
    else:
        lines = [f"config file: {config.file} (from {config.how})"]
    for role in roles:
        lines += ["", f"[{role}]"]
        rows = [(k, "(unset)" if v.value is None else _toml(v.value), v.where())
                for k, v in config.roles[role].items()]
        wk = max(len(r[0]) for r in rows)
        wv = max(len(r[1]) for r in rows)
        lines += [f"{k:<{wk}} = {v:<{wv}}  # {w}" for k, v, w in rows]
    return "\n".join(lines) + "\n"


def as_json(config: Config, roles=ROLES) -> dict:
    return {"file": str(config.file) if config.file else None, "how": config.how,
            "roles": {role: {k: {"value": v.value, "source": v.source, "origin": v.origin}
                             for k, v in config.roles[role].items()} for role in roles}}


# ------------------------------------------------------------------------ click glue for the daemons


_META = "snsbus.config"


class ConfigCliError(click.ClickException):
    """A :class:`ConfigError` met by a command: exit 2, as a bad flag is."""

    exit_code = 2


def daemon_options(role: str):
    """Add ``--config``, ``--log-format`` and ``--print-config`` to a daemon's click command.

    Place it right under ``@click.command``.  ``--config`` is eager: it loads the
    configuration before any other option is read and hands defaults, file and
    environment to click as ``default_map`` (so ``--help`` shows them too);
    flags given on the command line win.  The command receives ``log_format``;
    ``--print-config`` prints the effective values of the role, with their
    sources, and exits 0.
    """
    def load_into(ctx: click.Context, param, value):
        if ctx.resilient_parsing:  # shell completion: read nothing
            return value
        try:
            cfg = load(value)
        except ConfigError as e:
            raise ConfigCliError(str(e)) from e
        ctx.meta[_META] = cfg
        ctx.default_map = {k: v.value for k, v in cfg.roles[role].items() if v.source != "default"}
        return value

    def deco(f):
        @functools.wraps(f)
        def wrapper(*args, print_config: bool, **kwargs):
            if print_config:
                ctx = click.get_current_context()
                click.echo(render(effective(ctx, role), roles=(role,)), nl=False)
                ctx.exit(0)
            return f(*args, **kwargs)

        params = wrapper.__dict__.setdefault("__click_params__", [])
        # Inserted first, so that they are listed last in --help.
        params[:0] = [
            click.Option(["--print-config"], is_flag=True,
                         help="Print the effective configuration with the source of each value, then exit."),
            click.Option(["--log-format"], type=click.Choice(LOG_FORMATS), default=default(role, "log_format"),
                         show_default=True, help="human: readable lines; json: one JSON object per line."),
            click.Option(["--config", "config_file"], type=click.Path(dir_okay=False), is_eager=True,
                         expose_value=False, callback=load_into,
                         help=f"Configuration file [default: ${ENV_FILE}, ./{FILE_NAME}, "
                              f"~/.config/snsbus/{FILE_NAME}]."),
        ]
        return wrapper

    return deco


def effective(ctx, role: str) -> Config:
    """The role's values as the command received them: defaults, file, environment and flags."""
    from click.core import ParameterSource

    cfg: Config = ctx.meta.get(_META) or load()
    values = dict(cfg.roles[role])
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    for name, old in cfg.roles[role].items():
        if name not in ctx.params:
            continue
        src = ctx.get_parameter_source(name)
        if src == ParameterSource.COMMANDLINE:
            value = ctx.params[name]
            values[name] = Value(list(value) if isinstance(value, tuple) else value, "flag", flags.get(name))
    return Config(cfg.file, cfg.how, {**cfg.roles, role: values})
