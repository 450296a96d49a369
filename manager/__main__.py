"""``python -m manager``: run the manager (the tree's root) in the foreground.

``bus-ctl up`` starts it in the background; operators may run it directly
(e.g. from a systemd unit).  SIGTERM/SIGINT stop it cleanly (exit 0); a bind
failure exits 1.
"""

from __future__ import annotations

import sys

import click

from bus.policy import POLICIES, TreeConfig

_DEFAULTS = TreeConfig()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--control", default="tcp://127.0.0.1:7070", show_default=True, help="Control endpoint to bind.")
@click.option("--data", default="tcp://127.0.0.1:0", show_default=True, help="Data endpoint to bind.")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False), help="Write manager.json here.")
@click.option("--max-children", type=click.IntRange(1, 100000), default=_DEFAULTS.max_children, show_default=True)
@click.option("--policy", type=click.Choice(POLICIES), default="randtree", show_default=True)
@click.option("--heartbeat", type=float, default=_DEFAULTS.heartbeat, show_default=True,
              help="Seconds between heartbeats.")
@click.option("--misses", type=click.IntRange(1, 100), default=_DEFAULTS.misses, show_default=True,
              help="Silent heartbeats before a peer is dead.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(control, data, state_dir, max_children, policy, heartbeat, misses, log_level):
    """Run the snsbus manager until SIGTERM/SIGINT or `bus-ctl down`."""
    import asyncio
    import logging
    import signal

    from bus.planes import SocketSetupError
    from manager.server import Manager

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s manager[%(process)d] %(name)s: %(message)s")
    config = TreeConfig(max_children=max_children, policy=policy, heartbeat=heartbeat, misses=misses)

    async def run() -> int:
        mgr = Manager(control=control, data=data, config=config, state_dir=state_dir)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, mgr.request_stop)
        try:
            await mgr.start()
        except SocketSetupError as e:
            logging.getLogger("manager").error("%s", e)
            await mgr.stop()
            return 1
        try:
            await mgr.wait_stopped()
        finally:
            await mgr.stop()
        return 0

    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
