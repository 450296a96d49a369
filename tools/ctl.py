"""``bus-ctl``: the operator CLI of snsbus.

Commands talk to the manager's control API (see :mod:`tools.client`); ``up`` and
``down`` manage a local cluster (see :mod:`tools.cluster`).  The manager is
found through ``--endpoint`` (or ``$SNSBUS_ENDPOINT``), else through the
``manager.json`` of the state directory (``--state-dir``, ``$SNSBUS_STATE_DIR``).

Every command takes ``--json`` and then prints exactly the manager's result.

Exit codes: 0 success; 1 ``exec``: some node exited non-zero or did not answer;
2 usage error; 3 manager not running; 4 selector matches no node; 5 manager
timed out; 6 other manager error (also: the manager refused this client's key);
7 local cluster could not be started/stopped.

bus-ctl speaks CurveZMQ when its state directory holds a client key
(``client.key``, made by ``bus-ctl up`` or ``bus-ctl keys init``), pinned to the
manager's key found there (see :func:`bus.security.client_security`).

Imports are lazy: ``bus-ctl exec`` loads click, zmq, msgpack and this package's
small modules only (no asyncio, Pillow, lxml or psutil), so it stays quick.
"""

from __future__ import annotations

import json

import click

__all__ = [
    "main",
    "CtlCliError",
    "NotRunningError",
    "BadSelectorError",
    "TimeoutCliError",
    "ManagerCliError",
    "ClusterCliError",
    "EXIT_NODES_FAILED",
]

EXIT_NODES_FAILED = 1
EXEC_SLACK = 5.0  # seconds the client waits beyond an exec deadline for the merged reply


class CtlCliError(click.ClickException):
    """A ``bus-ctl`` failure: one sentence saying what to do, and an exit code."""

    exit_code = 6


class NotRunningError(CtlCliError):
    exit_code = 3


class BadSelectorError(CtlCliError):
    exit_code = 4


class TimeoutCliError(CtlCliError):
    exit_code = 5


class ManagerCliError(CtlCliError):
    exit_code = 6


class ClusterCliError(CtlCliError):
    exit_code = 7


# --------------------------------------------------------------------------- helpers


def _state_dir(state_dir):
    from tools import state

    return state.resolve_state_dir(state_dir)


def _endpoint(endpoint: str | None, state_dir) -> str:
    """The control endpoint: ``--endpoint``, else the state directory's manager.json."""
    if endpoint:
        return endpoint
    from tools import state

    sdir = state.resolve_state_dir(state_dir)
    info = state.manager_info(sdir)
    if not info or not info.get("control"):
        raise NotRunningError(
            f"no manager is recorded in {sdir}; start one with `bus-ctl up` "
            f"or point at a running one with --endpoint"
        )
    pid = info.get("pid")
    if isinstance(pid, int) and not state.pid_alive(pid):
        raise NotRunningError(
            f"manager not running (pid {pid} from {sdir / state.MANAGER_FILE} has exited); "
            f"start it with `bus-ctl up`"
        )
    return info["control"]


def _security():
    """This bus-ctl's CURVE settings from the command's state directory (``--state-dir``): its client key
    pinned to the manager's key; None without a client key (plain TCP).  See docs/security.md."""
    from bus.security import SecurityError, client_security

    ctx = click.get_current_context(silent=True)
    state_dir = ctx.params.get("state_dir") if ctx is not None else None
    try:
        return client_security(_state_dir(state_dir))
    except SecurityError as e:
        raise CtlCliError(str(e)) from e


def _call(endpoint: str, cmd: str, args: dict | None = None, timeout: float = 5.0):
    """One control request, with client errors turned into CLI errors."""
    from tools.client import BAD_SELECTOR, CtlClient, CtlError, CtlTimeout, ManagerNotRunning

    try:
        with CtlClient(endpoint, timeout=timeout, security=_security()) as client:
            return client.request(cmd, args or {})
    except ManagerNotRunning as e:
        raise NotRunningError(str(e)) from e
    except CtlTimeout as e:
        raise TimeoutCliError(
            f"{e}; retry with a longer --timeout or look at the manager's log"
        ) from e
    except CtlError as e:
        if e.code == BAD_SELECTOR:
            raise BadSelectorError(
                f"{e} (run `bus-ctl status` to see node names and attributes)"
            ) from e
        raise ManagerCliError(f"the manager refused `{cmd}` ({e.code}): {e}") from e


def _echo_json(result) -> None:
    click.echo(json.dumps(result, indent=2))


def _state_option(f):
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="State directory (default $SNSBUS_STATE_DIR or ~/.local/state/snsbus).",
    )(f)


def _json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(f)


def _manager_options(f):
    f = click.option(
        "--timeout",
        type=float,
        default=5.0,
        show_default=True,
        help="Seconds to wait for the manager's answer.",
    )(f)
    f = click.option(
        "--endpoint",
        envvar="SNSBUS_ENDPOINT",
        default=None,
        help="Control endpoint of a manager not started by `bus-ctl up` (env SNSBUS_ENDPOINT).",
    )(f)
    return _json_option(_state_option(f))


# --------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Log more (repeat for debug).")
def main(verbose: int) -> None:
    """Operate an snsbus cluster: start it, inspect the tree, run commands on nodes."""
    if verbose:
        import logging

        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
        )


@main.command()
@click.option("--local-nodes", "-n", type=click.IntRange(min=0), default=4, show_default=True,
              help="Logical bus-nodes to start on this machine.")
@click.option("--per-process", type=click.IntRange(min=1), default=1, show_default=True,
              help="Logical nodes hosted by each bus-node process (--virtual).")
@click.option("--max-children", type=click.IntRange(min=1), default=4, show_default=True,
              help="Children a tree node accepts before redirecting joins.")
@click.option("--policy", type=click.Choice(["randtree", "balanced", "star"]), default="randtree",
              show_default=True, help="Tree placement policy.")
@click.option("--port", type=click.IntRange(0, 65534), default=7070, show_default=True,
              help="Control port (data uses the next one); 0 picks free ports.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--heartbeat", type=float, default=None, help="Heartbeat interval in seconds.")
@click.option("--misses", type=int, default=None, help="Missed heartbeats before a peer is dead.")
@click.option("--wait", "wait_s", type=float, default=None,
              help="Seconds to wait for every node to join (default 30 + 0.05 per node).")
@click.option("--insecure", is_flag=True, default=False,
              help="No CurveZMQ (by default up makes and pre-authorizes every key the cluster needs).")
@_json_option
@_state_option
def up(local_nodes, per_process, max_children, policy, port, host, heartbeat, misses, wait_s, insecure,
       as_json, state_dir):
    """Start a manager and local bus-nodes in the background; wait until all joined."""
    from tools import cluster

    try:
        res = cluster.up(local_nodes, per_process, max_children, policy, state_dir=state_dir,
                         host=host, port=port, heartbeat=heartbeat, misses=misses, timeout=wait_s,
                         insecure=insecure)
    except cluster.ClusterError as e:
        raise ClusterCliError(str(e)) from e
    if as_json:
        _echo_json(res)
        return
    mgr = res["manager"]
    procs = len(res["nodes"])
    click.echo(
        f"manager pid {mgr['pid']} at {mgr['control']} (data {mgr['data']}); "
        f"{res['members']} nodes in {procs} process{'es' if procs != 1 else ''} joined "
        f"in {res['elapsed']:.1f}s"
    )
    if res.get("keys"):
        click.echo(f"CurveZMQ on: manager key {res['keys']['fingerprint']}, keys in {res['keys']['keys']} "
                   f"(see `bus-ctl keys list`)")
    else:
        click.echo("CurveZMQ off (--insecure): plain TCP")
    click.echo(f"state in {res['state_dir']}, logs in {res['logs']}; stop with `bus-ctl down`")


@main.command()
@click.option("--grace", type=float, default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
@_json_option
@_state_option
def down(grace, as_json, state_dir):
    """Stop the nodes and the manager started by `up`; remove the state files."""
    from tools import cluster

    try:
        res = cluster.down(state_dir, grace=grace)
    except (cluster.ClusterError, OSError) as e:
        raise ClusterCliError(f"could not stop the cluster in {_state_dir(state_dir)}: {e}") from e
    if as_json:
        _echo_json(res)
        return
    if not res["stopped"] and not res["removed"]:
        click.echo(f"nothing to stop in {_state_dir(state_dir)}")
        return
    for item in res["stopped"]:
        click.echo(f"{item['role']} {item.get('name') or ''} (pid {item['pid']}): {item['how']}")
    for path in res["removed"]:
        click.echo(f"removed {path}")


@main.command()
@_manager_options
def ping(as_json, state_dir, endpoint, timeout):
    """Check that the manager answers; print its pid, epoch, uptime and member count."""
    res = _call(_endpoint(endpoint, state_dir), "ping", timeout=timeout)
    if as_json:
        _echo_json(res)
        return
    click.echo(
        f"manager pid {res.get('pid')} epoch {res.get('epoch')} up {res.get('uptime', 0):.1f}s, "
        f"{res.get('members')} members"
    )


@main.command()
@click.argument("app", required=False)
@click.option("--events", "n_events", type=int, default=10, show_default=True,
              help="Recent failure/repair events to show.")
@_manager_options
def status(app, n_events, as_json, state_dir, endpoint, timeout):
    """Members of the tree (table), summary, and recent failures and repairs.

    With APP: the application's phases, and per component and node its
    processes (state, pid, restarts, last exit code).
    """
    if app:
        res = _call(_endpoint(endpoint, state_dir), "app_status", {"app": app, "timeout": timeout},
                    timeout=timeout + 2)
        if as_json:
            _echo_json(res)
            return
        from tools.render_apps import format_app_status

        click.echo(format_app_status(res), nl=False)
        return
    res = _call(_endpoint(endpoint, state_dir), "status", timeout=timeout)
    if as_json:
        _echo_json(res)
        return
    from tools.render import format_status

    click.echo(format_status(res, events=n_events), nl=False)


@main.command()
@click.option("--png", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also draw the tree into this PNG file.")
@_manager_options
def tree(png, as_json, state_dir, endpoint, timeout):
    """The overlay tree as an indented text tree (or a PNG with --png)."""
    res = _call(_endpoint(endpoint, state_dir), "tree", timeout=timeout)
    if png:
        from tools.treeviz import render_png

        try:
            w, h = render_png(res, png)
        except OSError as e:
            raise CtlCliError(f"cannot write {png}: {e}; choose another path with --png") from e
    if as_json:
        _echo_json(res)
        return
    if png:
        click.echo(f"wrote {png} ({w}x{h} px, {len(res.get('members') or [])} members)")
        return
    from tools.treeviz import render_text

    click.echo(render_text(res), nl=False)


# Options end at the first word of COMMAND (so `exec ls -l` works without `--`);
# an unknown option before it is a usage error, never part of the command.
@main.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--nodes", "selector", default=None,
              help="Comma-separated name globs (node-1*,web-?) or key=value on attributes.")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Deadline in seconds; nodes that miss it are listed as timed out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--endpoint", envvar="SNSBUS_ENDPOINT", default=None,
              help="Control endpoint of a manager not started by `bus-ctl up`.")
@_state_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(selector, timeout, as_json, endpoint, state_dir, command):
    """Run COMMAND through the shell on every selected node; group identical outputs.

    Arguments are joined with spaces, as ssh does: `bus-ctl exec -- uname -a`.
    Exits 1 if any node exited non-zero or did not answer.
    """
    cmd = " ".join(command)
    args = {"cmd": cmd, "selector": selector, "timeout": timeout}
    res = _call(_endpoint(endpoint, state_dir), "exec", args, timeout=timeout + EXEC_SLACK)
    from tools.render import exec_failed, format_exec

    if as_json:
        _echo_json(res)
    else:
        out, err = format_exec(res)
        click.echo(out, nl=False)
        click.echo(err, nl=False, err=True)
    if exec_failed(res):
        click.get_current_context().exit(EXIT_NODES_FAILED)


from tools import ctl_apps  # noqa: E402,F401  (registers deploy, apps, logs, stop, start, cleanup)
from tools import ctl_config  # noqa: E402,F401  (registers config show/example, completion; [ctl] defaults)
from tools import ctl_keys  # noqa: E402,F401  (registers keys init/list/add/accept/revoke)

if __name__ == "__main__":
    # `python -m tools.ctl`: the commands are registered on the importable module's group.
    from tools.ctl import main as _registered

    _registered()
