"""``bus-ctl`` application commands: deploy, apps, status APP, logs, stop, start, cleanup.

Registered on :data:`tools.ctl.main`; rendering lives in :mod:`tools.render_apps`.
Exit codes as in :mod:`tools.ctl`, plus 1 when a deploy (or stop/start/cleanup)
failed on some node.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from tools.ctl import (EXIT_NODES_FAILED, ClusterCliError, CtlCliError, _call, _echo_json, _endpoint,
                       _manager_options, _security, main)

POLL = 0.2  # seconds between progress polls


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CtlCliError(f"cannot read the {what} {path}: {e.strerror if isinstance(e, OSError) else e}") from e


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--resources", "-r", "resources", required=True, type=click.Path(dir_okay=False),
              help="Resource directory XML (which machines exist).")
@click.option("--no-bootstrap", is_flag=True,
              help="Do not start bus-nodes for resources that are not in the tree yet.")
@click.option("--identity", "-i", default=None, type=click.Path(dir_okay=False),
              help="ssh private key for the ssh resources (default: ssh's own).")
@click.option("--known-hosts", default=None, type=click.Path(dir_okay=False),
              help="known_hosts file for the ssh resources (checked strictly when given).")
@click.option("--no-wait", is_flag=True, help="Return once the manager accepted the deploy.")
@click.option("--force", is_flag=True, help="Deploy again even if the same spec is deployed.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Replace ${KEY} (or ${KEY:-default}) in the spec before it is sent (repeatable). "
                   "What is left is expanded on each node from the process environment.")
@click.option("--deploy-timeout", type=float, default=600.0, show_default=True,
              help="Seconds the whole deploy may take.")
@_manager_options
def deploy(spec, resources, no_bootstrap, identity, known_hosts, no_wait, force, sets, deploy_timeout, as_json, state_dir, endpoint, timeout):
    """Deploy the application SPEC (Plush XML) onto the machines of --resources.

    Shows a progress bar per phase (install per component, then every block)
    and ends with a summary. Exits 1 if the deploy failed.
    """
    spec_text, res_text = _read(spec, "spec"), _read(resources, "resource directory")
    spec_text = apply_sets(spec_text, sets)
    ep = _endpoint(endpoint, state_dir)
    if not no_bootstrap:
        _bootstrap(ep, res_text, resources, state_dir, quiet=as_json, identity=identity, known_hosts=known_hosts)
    args = {"spec": spec_text, "spec_file": os.path.abspath(spec), "resources": res_text,
            "resources_file": os.path.abspath(resources), "cwd": os.getcwd(), "force": force,
            "timeout": deploy_timeout}
    started = _call(ep, "deploy", args, timeout=max(timeout, 60.0))
    from tools.render_apps import format_progress, format_summary

    if started.get("already") and not as_json:
        click.echo(f"{started['app']} is already deployed (gen {started['gen']}, {started['phase']}); "
                   f"nothing started. Use --force to deploy again.")
    if no_wait:
        if as_json:
            _echo_json(started)
        return
    tty = sys.stdout.isatty() and not as_json
    last = None
    deadline = time.monotonic() + deploy_timeout + 30
    while True:
        prog = _call(ep, "progress", {"app": started["app"]}, timeout=timeout)
        text = format_progress(prog)
        if not as_json and text != last and not started.get("already"):
            if tty and last is not None:
                click.echo(f"\x1b[{last.count(chr(10))}F\x1b[J", nl=False)  # redraw in place
                click.echo(text, nl=False)
            else:  # a log or a pipe: only the lines that changed
                seen = set((last or "").splitlines())
                click.echo("".join(line + "\n" for line in text.splitlines() if line not in seen), nl=False)
            last = text
        if prog["phase"] != "deploying" or time.monotonic() > deadline:
            break
        time.sleep(POLL)
    if as_json:
        _echo_json(prog)
    else:
        click.echo(format_summary(prog), nl=False)
    if prog["phase"] not in ("running", "completed"):
        click.get_current_context().exit(EXIT_NODES_FAILED)


def apply_sets(text: str, sets) -> str:
    """Substitute ``--set KEY=VALUE`` pairs into ``${KEY}`` / ``${KEY:-default}`` (XML-escaped)."""
    import re
    from xml.sax.saxutils import escape

    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        value = escape(value, {'"': "&quot;"})
        text = re.sub(r"\$\{" + key + r"(?::-[^}]*)?\}", lambda m: value, text)
    return text


def _bootstrap(ep: str, res_text: str, res_file: str, state_dir, quiet: bool, identity=None,
               known_hosts=None) -> None:
    """Start a bus-node for every resource of the directory that is not in the tree yet."""
    from manager.resources import DirectoryError, parse_directory

    try:
        resources = parse_directory(res_text, os.path.abspath(res_file))
    except DirectoryError as e:
        raise CtlCliError(str(e)) from e
    members = {m.get("name") for m in _call(ep, "status").get("members", []) if m.get("state") == "alive"}
    missing = [r for r in resources if r.name not in members]
    if not missing:
        return
    from tools import cluster

    local = [r for r in missing if r.type == "local"]
    remote = [r for r in missing if r.type == "ssh"]
    for r in local:
        try:
            cluster.start_named_node(state_dir, r.name, join=ep, group=r.group, attrs=dict(r.attrs))
        except cluster.ClusterError as e:
            raise ClusterCliError(f"cannot start a local bus-node for resource {r.name}: {e}") from e
    if remote:
        from tools.bootstrap import BootstrapError, bootstrap_all, build_wheelhouse

        try:
            wheelhouse = build_wheelhouse()
        except BootstrapError as e:
            raise ClusterCliError(str(e)) from e
        from bus.security import encode_key
        from tools.bootstrap import admit

        security = _security()  # with CURVE, each node pins the manager's key and waits, pending, until admitted
        mkey = encode_key(security.manager_key) if security is not None else None
        results = bootstrap_all(remote, ep, wheelhouse=wheelhouse, identity_file=identity, known_hosts=known_hosts,
                                manager_key=mkey)
        errors = [res for res in results.values() if isinstance(res, BootstrapError)]
        if errors:
            raise ClusterCliError("; ".join(str(e).splitlines()[0] for e in errors))
        try:
            for res in results.values():
                if res.key:
                    admit(lambda cmd, **a: _call(ep, cmd, a), f"ssh-{res.name}", res.key)
        except BootstrapError as e:
            raise ClusterCliError(str(e)) from e
    if not quiet:
        click.echo(f"started bus-node for {', '.join(r.name for r in missing)}; waiting for them to join")
    names = {r.name for r in missing}
    deadline = time.monotonic() + 30
    while True:
        members = {m.get("name") for m in _call(ep, "status").get("members", []) if m.get("state") == "alive"}
        if names <= members:
            return
        if time.monotonic() > deadline:
            raise ClusterCliError(f"resources {', '.join(sorted(names - members))} did not join the tree "
                                  f"within 30s; see the logs in the state directory")
        time.sleep(0.1)


@main.command()
@_manager_options
def apps(as_json, state_dir, endpoint, timeout):
    """Applications the manager knows, with their phase."""
    res = _call(_endpoint(endpoint, state_dir), "apps", timeout=timeout)
    if as_json:
        _echo_json(res)
        return
    from tools.render_apps import format_apps

    click.echo(format_apps(res), nl=False)


@main.command()
@click.argument("app")
@click.option("--node", default=None, help="Only this node.")
@click.option("--process", default=None, help="Only this process.")
@click.option("--stderr", "stderr", is_flag=True, help="Show stderr instead of stdout.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until interrupted.")
@click.option("--tail", type=int, default=8192, show_default=True, help="Bytes of each log to show first.")
@_manager_options
def logs(app, node, process, stderr, follow, tail, as_json, state_dir, endpoint, timeout):
    """Output of the application's processes, per node (identical logs grouped)."""
    ep = _endpoint(endpoint, state_dir)
    args = {"app": app, "node": node, "process": process, "stream": "err" if stderr else "out", "timeout": timeout}
    from tools.render_apps import format_logs, next_offsets

    offsets: dict = {}
    first = True
    try:
        while True:
            q = dict(args, offsets=offsets, limit=tail if first else 1 << 20)
            if first:
                q["offsets"] = {}
            res = _call(ep, "logs", q, timeout=timeout + 2)
            if as_json:
                _echo_json(res)
            else:
                click.echo(format_logs(res, prefix=follow), nl=False)
            if not follow:
                break
            offsets = next_offsets(res, offsets)
            first = False
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


@main.command()
@_manager_options
def services(as_json, state_dir, endpoint, timeout):
    """TACC services: workers and caches per node, queues, recent spawns and reaps."""
    res = _call(_endpoint(endpoint, state_dir), "services", timeout=timeout)
    if as_json:
        _echo_json(res)
        return
    from tools.render_apps import format_services

    click.echo(format_services(res), nl=False)


def _toggle(enabled: bool):
    @_manager_options
    @click.argument("service")
    @click.argument("worker")
    def command(service, worker, as_json, state_dir, endpoint, timeout):
        res = _call(_endpoint(endpoint, state_dir), "svc_enable",
                    {"svc": service, "worker": worker, "enabled": enabled}, timeout=timeout)
        if as_json:
            _echo_json(res)
        else:
            click.echo(f"{service}/{worker}: {'enabled' if res['enabled'] else 'disabled'}")
    return command


main.command("disable", help="Disable a worker class of a service: its workers are reaped, none spawned.")(
    _toggle(False))
main.command("enable", help="Enable a worker class of a service again.")(_toggle(True))


def _simple(cmd: str, verb: str):
    @_manager_options
    @click.argument("app")
    def command(app, as_json, state_dir, endpoint, timeout):
        res = _call(_endpoint(endpoint, state_dir), cmd, {"app": app, "timeout": max(timeout, 30.0)},
                    timeout=max(timeout, 30.0) + 5)
        if as_json:
            _echo_json(res)
        else:
            from tools.render_apps import format_done

            click.echo(format_done(res, verb), nl=False)
        if res.get("failed") or res.get("missing"):
            click.get_current_context().exit(EXIT_NODES_FAILED)
    return command


main.command("stop", help="Stop every process of APP (they are not restarted).")(_simple("stop", "stopped"))
main.command("start", help="Start again the processes of APP that were stopped.")(_simple("start", "started"))
main.command("cleanup", help="Stop APP everywhere and remove its files; safe to repeat.")(
    _simple("cleanup", "cleaned"))
