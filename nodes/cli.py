"""``bus-node``: the agent that runs on every machine and joins the tree.

Exit codes: 0 stopped by SIGTERM/SIGINT; 1 could not start (e.g. bind failed);
2 bad usage (or a bad configuration, or no manager key to pin); 3 did not reach
the tree within ``--join-timeout``; 4 the manager revoked this node's key.

CurveZMQ is on unless ``--insecure``: the node's key pair lives in ``--key-dir``
(made on first start) and it pins the manager's key (``KEY_DIR/manager.pub`` or
``--manager-key``); see docs/security.md.

Every option's default comes from ``[node]`` of snsbus.toml and then from
``SNSBUS_NODE_<KEY>`` (see :mod:`bus.config`); ``--join`` may come from there too.
"""

from __future__ import annotations

import os
import socket as _socket
import sys

import click

from bus.config import daemon_options

__all__ = ["main"]

EXIT_OK, EXIT_START, EXIT_USAGE, EXIT_JOIN, EXIT_REVOKED = 0, 1, 2, 3, 4


def _attrs(pairs: tuple[str, ...], group: str | None) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--attr")
        out[key] = value
    if group:
        out["group"] = group
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@daemon_options("node")
@click.option("--join", "join", required=True, metavar="tcp://HOST:PORT", help="The manager's control endpoint.")
@click.option("--name", default=None, help="Node name (default: the host name); NAME-0..NAME-(N-1) with --virtual.")
@click.option("--virtual", type=click.IntRange(1, 100000), default=1, show_default=True,
              help="Logical nodes hosted by this process.")
@click.option("--group", default=None, help="Resource group (sets the attribute group=G).")
@click.option("--attr", "attr", multiple=True, metavar="KEY=VALUE", help="Free-form attribute (repeatable).")
@click.option("--bind-host", default=None, help="Address to bind (default: 127.0.0.1 when joining loopback, else 0.0.0.0).")
@click.option("--advertise", default=None, help="Address other nodes use to reach this one (default: the bind address).")
@click.option("--join-timeout", type=float, default=0.0, help="Give up (exit 3) if not joined after S seconds; 0 = never.")
@click.option("--state-dir", default=None, metavar="DIR",
              help="Where applications live (packages, files, logs); default $SNSBUS_NODE_DIR or ~/.snsbus/node.")
@click.option("--key-dir", default=None, metavar="DIR",
              help="CurveZMQ keys: identity.key (made on first start), manager.pub, the keyring; default STATE_DIR/keys.")
@click.option("--manager-key", default=None, metavar="Z85|FILE",
              help="The manager's public key to pin [default: KEY_DIR/manager.pub].")
@click.option("--insecure", is_flag=True, default=False, help="No CurveZMQ: plain TCP (the manager must agree).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(join, name, virtual, group, attr, bind_host, advertise, join_timeout, state_dir, key_dir, manager_key,
         insecure, log_level, log_format):
    """Join the snsbus tree at JOIN and serve until stopped."""
    # bus-node never speaks TLS (CURVE secures the bus), and asyncio imports
    # ssl only if it can: keeping OpenSSL out saves ~5 MB of RSS per process.
    sys.modules.setdefault("ssl", None)
    import asyncio
    import logging
    import signal

    from bus import logs

    logs.setup("bus-node", log_level, log_format)
    if not join.startswith("tcp://"):
        raise click.BadParameter("expected tcp://HOST:PORT", param_hint="--join")
    host = join[len("tcp://"):].rsplit(":", 1)[0]
    loopback = host in ("127.0.0.1", "localhost", "::1")
    bind_host = bind_host or ("127.0.0.1" if loopback else "0.0.0.0")
    if advertise is None and bind_host == "0.0.0.0":
        advertise = _socket.gethostname()
    base = name or _socket.gethostname()
    names = [base] if virtual == 1 else [f"{base}-{i}" for i in range(virtual)]
    attrs = _attrs(attr, group)
    sdir = state_dir or os.environ.get("SNSBUS_NODE_DIR") or os.path.expanduser("~/.snsbus/node")
    security = None
    if not insecure:
        from bus.security import SecurityError, Security

        try:
            security = Security.from_key_dir(key_dir or os.path.join(sdir, "keys"), manager_key=manager_key,
                                             name=base)
        except SecurityError as e:
            raise click.UsageError(f"{e} (or run with --insecure if the manager does)") from None

    from bus.planes import SocketSetupError
    from nodes.agent import NodeHost

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        host_ = NodeHost(join, names, bind_host=bind_host, advertise_host=advertise, attrs=attrs, state_dir=sdir,
                         security=security)
        host_.on_revoked = stop.set
        try:
            await host_.start()
        except SocketSetupError as e:
            logging.getLogger("bus-node").error("%s", e)
            await host_.stop()
            return EXIT_START
        code = EXIT_OK
        try:
            if join_timeout > 0:
                deadline = loop.time() + join_timeout
                while host_.joined() < len(names) and not stop.is_set():
                    if loop.time() > deadline:
                        logging.getLogger("bus-node").error(
                            "only %d of %d nodes joined %s within %.1fs", host_.joined(), len(names), join, join_timeout)
                        code = EXIT_JOIN
                        stop.set()
                        break
                    await asyncio.sleep(0.05)
            await stop.wait()
        finally:
            await host_.stop()
        if host_.revoked:
            logging.getLogger("bus-node").error("the manager revoked this node's key; stopped")
            return EXIT_REVOKED
        return code

    sys.exit(asyncio.run(run()))


if __name__ == "__main__":  # pragma: no cover
    main()
