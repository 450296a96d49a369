"""``bus-ctl`` configuration commands: ``config show``, ``config example``, ``completion``.

Registered on :data:`tools.ctl.main`.  Importing this module also gives every
``bus-ctl`` command the ``[ctl]`` section of snsbus.toml (and
``SNSBUS_CTL_ENDPOINT``, ``SNSBUS_CTL_STATE_DIR``) as defaults for its
``--endpoint`` and ``--state-dir``: the file is read when a command starts,
never at import.  Flags still win, and ``$SNSBUS_ENDPOINT`` /
``$SNSBUS_STATE_DIR`` keep working (below the ``SNSBUS_CTL_*`` names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import click

from bus import config as cfg
from tools.ctl import main

SHELLS = ("bash", "zsh", "fish")
PROG = "bus-ctl"
COMPLETE_VAR = "_BUS_CTL_COMPLETE"  # what click's generated script sets when it asks bus-ctl for completions
_SELF_READING = frozenset({"config", "completion"})  # these read (or ignore) the file themselves


class _CtlDefaults(Mapping):
    """click's ``default_map`` of the bus-ctl group: ``get(command)`` reads the configuration then.

    The group itself has no configurable option (lookups by option name find
    nothing); each subcommand's context asks ``get(its name)`` once when it is
    created, so the file is read once per invocation, with the environment of
    that moment.
    """

    def __getitem__(self, name):
        raise KeyError(name)

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def get(self, name, default=None):
        if name in _SELF_READING or COMPLETE_VAR in os.environ:  # completing a word: read nothing
            return default
        try:
            loaded = cfg.load()
        except cfg.ConfigError as e:
            raise cfg.ConfigCliError(str(e)) from e
        return {k: v.value for k, v in loaded.roles["ctl"].items() if v.source != "default"}


main.context_settings["default_map"] = _CtlDefaults()


@main.group("config")
def config_group() -> None:
    """The effective configuration (snsbus.toml, SNSBUS_* variables) and an example file."""


@config_group.command("show")
@click.option("--role", type=click.Choice(cfg.ROLES), default=None,
              help="Only this section [default: every role].")
@click.option("--config", "path", type=click.Path(dir_okay=False), default=None,
              help="File to read [default: $SNSBUS_CONFIG, ./snsbus.toml, ~/.config/snsbus/snsbus.toml].")
@click.option("--json", "as_json", is_flag=True, help="Print {file, how, roles: {role: {key: {value, source, "
                                                      "origin}}}}.")
def config_show(role, path, as_json):
    """Print every setting with its value and where it came from (default, file PATH, env VAR).

    Flags are not known here: `bus-node ... --print-config` (and the same on
    `python -m manager` and `python -m frontends`) shows a daemon's values with
    its flags too.
    """
    try:
        loaded = cfg.load(path)
    except cfg.ConfigError as e:
        raise cfg.ConfigCliError(str(e)) from e
    roles = (role,) if role else cfg.ROLES
    if as_json:
        click.echo(json.dumps(cfg.as_json(loaded, roles), indent=2))
    else:
        click.echo(cfg.render(loaded, roles), nl=False)


@config_group.command("example")
def config_example():
    """Print an snsbus.toml with every key and its default, commented out (examples/snsbus.toml)."""
    click.echo(cfg.example_toml(), nl=False)


@main.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell):
    """Print the shell completion script of bus-ctl for SHELL.

    \b
    bash:  eval "$(bus-ctl completion bash)"   (or save it in ~/.local/share/bash-completion/completions/bus-ctl)
    zsh:   eval "$(bus-ctl completion zsh)"    (in ~/.zshrc)
    fish:  bus-ctl completion fish > ~/.config/fish/completions/bus-ctl.fish
    """
    from click.shell_completion import get_completion_class

    comp = get_completion_class(shell)(main, {}, PROG, COMPLETE_VAR)
    click.echo(comp.source())
