"""``python -m frontends``: run one HTTP front end of a TACC service in the foreground.

Example (the TranSend demo)::

    python -m frontends --manager tcp://127.0.0.1:7070 --service transend --port 8080 \\
        --profiles profiles.db --origin http://127.0.0.1:8000 --timeout 3

SIGTERM/SIGINT stop it cleanly (exit 0); a port already in use exits 1; a bad
flag or configuration exits 2.  Logs go to stderr (``--log-format json``: one
JSON object per line).  Every option's default comes from ``[frontend]`` of
snsbus.toml and then from ``SNSBUS_FRONTEND_<KEY>`` (see :mod:`bus.config`).
CurveZMQ is on unless ``--insecure``; run by a bus-node, a front end uses that
node's key dir and pinned manager key (``$SNSBUS_KEY_DIR``, ``$SNSBUS_MANAGER_KEY``).
"""

from __future__ import annotations

import sys

import click

from bus.config import daemon_options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@daemon_options("frontend")
@click.option("--manager", required=True, help="The manager's control endpoint, e.g. tcp://127.0.0.1:7070.")
@click.option("--service", default="transend", show_default=True, help="The service whose beacons to follow.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="HTTP port (0: any).")
@click.option("--profiles", type=click.Path(dir_okay=False), default=None,
              help="SQLite profile database (created if missing); without it every user gets the defaults.")
@click.option("--origin", "origins", multiple=True, metavar="URL",
              help="An origin images may be fetched from (scheme://host:port); repeat for several.")
@click.option("--timeout", default=3.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds a request may wait for workers before the answer turns approximate.")
@click.option("--attempt-timeout", type=click.FloatRange(min=0.01), default=None,
              help="Seconds to wait for one worker before re-dispatching [default: half of --timeout].")
@click.option("--attempts", default=3, show_default=True, type=click.IntRange(1, 32), help="Workers tried per request.")
@click.option("--max-queue", default=32, show_default=True, type=click.IntRange(min=1),
              help="Queue + in-flight at which a worker counts as full (all full: approximate answer).")
@click.option("--fetch-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds for fetching one original from its origin.")
@click.option("--max-original", default=None, type=click.IntRange(min=1),
              help="Largest original in bytes [default and maximum: the bus's frame limit, 8 MiB].")
@click.option("--access-log", is_flag=True, help="Log every HTTP request.")
@click.option("--key-dir", default=None, metavar="DIR",
              help="CurveZMQ keys [default: $SNSBUS_KEY_DIR (set by the bus-node that runs it), "
                   "else ~/.snsbus/frontend/keys].")
@click.option("--manager-key", default=None, metavar="Z85|FILE",
              help="The manager's public key to pin [default: $SNSBUS_MANAGER_KEY, else KEY_DIR/manager.pub].")
@click.option("--insecure", is_flag=True, default=False, help="No CurveZMQ: plain TCP (the manager must agree).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(manager, service, host, port, profiles, origins, timeout, attempt_timeout, attempts, max_queue,
         fetch_timeout, max_original, access_log, key_dir, manager_key, insecure, log_level, log_format):  # fmt: skip
    """Serve /distill, /sheet, /health and /stats for SERVICE, dispatching to its workers."""
    import asyncio
    import logging
    import signal

    from bus import logs
    from bus.planes import SocketSetupError
    from frontends.server import FrontEndConfig, serve

    logs.setup("frontend", log_level, log_format)
    extra = {} if max_original is None else {"max_original": max_original}
    if not insecure:
        import os

        from bus.security import Security, SecurityError

        try:
            extra["security"] = Security.from_key_dir(key_dir or os.path.expanduser("~/.snsbus/frontend/keys"),
                                                      manager_key=manager_key, name="frontend")
        except SecurityError as e:
            raise click.UsageError(f"{e} (or run with --insecure if the manager does)") from None
    try:
        config = FrontEndConfig(manager=manager, service=service, origins=tuple(origins), profiles=profiles,
                                timeout=timeout, attempt_timeout=attempt_timeout, attempts=attempts,
                                max_queue=max_queue, fetch_timeout=fetch_timeout, **extra)  # fmt: skip
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if not config.origins:
        logging.getLogger("frontends").warning("no --origin given: every /distill will be refused (403)")

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(config, host, port, stop=stop, access_log=access_log)
        except SocketSetupError as e:
            logging.getLogger("frontends").error("%s; check --manager", e)
            return 1
        except OSError as e:
            logging.getLogger("frontends").error("cannot listen on %s:%d: %s", host, port, e)
            return 1
        return 0

    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
