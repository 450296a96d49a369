"""``python -m manager``: run the manager (the tree's root) in the foreground.

``bus-ctl up`` starts it in the background; operators may run it directly
(e.g. from a systemd unit).  SIGTERM/SIGINT stop it cleanly (exit 0); a bind
failure exits 1; a bad flag or configuration exits 2.

Every option's default comes from ``[manager]`` of snsbus.toml and then from
``SNSBUS_MANAGER_<KEY>`` (see :mod:`bus.config`); ``--xmlrpc`` serves the
XML-RPC API (:mod:`manager.xmlrpc`).  CurveZMQ is on unless ``--insecure``:
the key store (``--keys``) is created on first start (:mod:`manager.keys`,
docs/security.md); a key store it cannot read exits 1.
"""

from __future__ import annotations

import sys

import click

from bus.config import daemon_options
from bus.policy import POLICIES, TreeConfig

_DEFAULTS = TreeConfig()


def _xmlrpc_address(xmlrpc, allow_remote, token_file):
    """(host, port, token) for the XML-RPC API, or None when it is off; usage errors name the flag."""
    if not xmlrpc:
        return None
    from manager.xmlrpc import XmlRpcError, is_loopback, parse_address

    try:
        host, port = parse_address(xmlrpc)
    except XmlRpcError as e:
        raise click.BadParameter(str(e), param_hint="--xmlrpc") from None
    token = None
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"cannot read {token_file}: {e}", param_hint="--xmlrpc-token-file") from None
        if not token:
            raise click.BadParameter(f"{token_file} is empty", param_hint="--xmlrpc-token-file")
    if not is_loopback(host):
        if not allow_remote:
            raise click.BadParameter(f"{host} is not a loopback address; the XML-RPC API lets anyone who reaches "
                                     f"it run commands on every node: add --xmlrpc-allow-remote and "
                                     f"--xmlrpc-token-file to allow it", param_hint="--xmlrpc")
        if token is None:
            raise click.BadParameter(f"binding {host} needs a token", param_hint="--xmlrpc-token-file")
    return host, port, token


def _monitor_options(port, host, token_file, frontends, alert_command, alert_webhook, lost_percent):
    """start_monitor keywords, or None when neither the monitor nor alerts are asked for."""
    if port is None and not alert_command and not alert_webhook:
        return None
    from manager.alerts import AlertConfig, AlertEngine, AlertHooks
    from manager.monitor import is_loopback

    token = None
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip() or None
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"cannot read {token_file}: {e}", param_hint="--monitor-token-file") from None
    if not is_loopback(host) and not token:
        raise click.BadParameter(f"{host} is not a loopback address: the monitor there needs a token",
                                 param_hint="--monitor-token-file")
    hooks = AlertHooks(command=alert_command, webhook=alert_webhook) if (alert_command or alert_webhook) else None
    # Alerts need the monitor's sampler; without --monitor-port it listens on a free loopback port.
    return {"host": host, "port": port or 0, "token": token, "frontends": tuple(frontends),
            "alerts": AlertEngine(AlertConfig(lost_percent=lost_percent), hooks)}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@daemon_options("manager")
@click.option("--control", default="tcp://127.0.0.1:7070", show_default=True, help="Control endpoint to bind.")
@click.option("--data", default="tcp://127.0.0.1:0", show_default=True, help="Data endpoint to bind.")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False), help="Write manager.json here.")
@click.option("--max-children", type=click.IntRange(1, 100000), default=_DEFAULTS.max_children, show_default=True)
@click.option("--policy", type=click.Choice(POLICIES), default="randtree", show_default=True)
@click.option("--heartbeat", type=float, default=_DEFAULTS.heartbeat, show_default=True,
              help="Seconds between heartbeats.")
@click.option("--misses", type=click.IntRange(1, 100), default=_DEFAULTS.misses, show_default=True,
              help="Silent heartbeats before a peer is dead.")
@click.option("--xmlrpc", default=None, metavar="[HOST:]PORT",
              help="Serve the XML-RPC API here (HOST defaults to 127.0.0.1; port 0: any) [default: off].")
@click.option("--xmlrpc-allow-remote", is_flag=True, default=False,
              help="Allow --xmlrpc on a non-loopback address (needs --xmlrpc-token-file).")
@click.option("--xmlrpc-token-file", default=None, type=click.Path(dir_okay=False),
              help="File with the token XML-RPC clients must send as their HTTP basic-auth password.")
@click.option("--monitor-port", type=click.IntRange(0, 65535), default=None,
              help="Serve the web monitor and /metrics here (0: any) [default: off].")
@click.option("--monitor-host", default="127.0.0.1", show_default=True,
              help="Monitor address; a non-loopback one needs --monitor-token-file.")
@click.option("--monitor-token-file", type=click.Path(dir_okay=False), default=None,
              help="File with the token readers send (?token= or Authorization: Bearer).")
@click.option("--monitor-frontend", "monitor_frontend", multiple=True, metavar="URL",
              help="A front end whose /stats the monitor polls (repeat); subscribed front ends are found anyway.")
@click.option("--alert-command", default=None, metavar="CMD",
              help="Shell command run per alert: JSON on stdin, SNSBUS_ALERT_* in its environment.")
@click.option("--alert-webhook", default=None, metavar="URL", help="URL each alert is POSTed to as JSON.")
@click.option("--alert-lost-percent", type=click.FloatRange(0, 100, min_open=True), default=20.0,
              show_default=True, help="Alert when the tree loses more than this share of its nodes.")
@click.option("--keys", default=None, type=click.Path(file_okay=False),
              help="CurveZMQ key store [default: STATE_DIR/keys, else ~/.snsbus/manager/keys; made on first start].")
@click.option("--open", is_flag=True, default=False,
              help="Accept every new key as it shows up (development only).")
@click.option("--insecure", is_flag=True, default=False, help="No CurveZMQ: plain TCP (every node must agree).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(control, data, state_dir, max_children, policy, heartbeat, misses, xmlrpc, xmlrpc_allow_remote,
         xmlrpc_token_file, monitor_port, monitor_host, monitor_token_file, monitor_frontend, alert_command,
         alert_webhook, alert_lost_percent, keys, open, insecure, log_level, log_format):  # noqa: A002
    """Run the snsbus manager until SIGTERM/SIGINT or `bus-ctl down`."""
    import asyncio
    import logging
    import signal

    from bus import logs
    from bus.planes import SocketSetupError
    from manager.server import Manager

    rpc_at = _xmlrpc_address(xmlrpc, xmlrpc_allow_remote, xmlrpc_token_file)
    monitor = _monitor_options(monitor_port, monitor_host, monitor_token_file, monitor_frontend, alert_command,
                               alert_webhook, alert_lost_percent)
    logs.setup("manager", log_level, log_format)
    config = TreeConfig(max_children=max_children, policy=policy, heartbeat=heartbeat, misses=misses)
    key_service = None
    if not insecure:
        import os

        from manager.keys import KeyService, KeyStore

        default = os.path.join(state_dir, "keys") if state_dir else os.path.expanduser("~/.snsbus/manager/keys")
        key_service = KeyService(KeyStore(keys or default), open=open)
    elif open:
        raise click.BadParameter("--open admits keys, and --insecure has none: choose one", param_hint="--open")

    async def run() -> int:
        mgr = Manager(control=control, data=data, config=config, state_dir=state_dir, monitor=monitor, keys=key_service)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, mgr.request_stop)
        from manager.monitor import MonitorError

        from bus.security import SecurityError

        try:
            await mgr.start()
        except (SocketSetupError, MonitorError, SecurityError) as e:
            logging.getLogger("manager").error("%s", e)
            await mgr.stop()
            return 1
        rpc = None
        if rpc_at is not None:
            from manager.xmlrpc import start_xmlrpc

            host, port, token = rpc_at
            try:
                rpc = start_xmlrpc(mgr, host, port, allow_remote=xmlrpc_allow_remote, token=token)
            except OSError as e:
                logging.getLogger("manager").error("cannot serve XML-RPC on %s:%d: %s", host, port, e)
                await mgr.stop()
                return 1
        try:
            await mgr.wait_stopped()
        finally:
            if rpc is not None:
                await rpc.aclose()
            await mgr.stop()
        return 0

    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
