"""A fake bus-node process (same flags as ``bus-node``) for the fake manager.

Registers its logical names with ``fake_join`` and then waits for SIGTERM or
SIGINT (exit 0).  ``--ignore-term`` makes it ignore SIGTERM, so only SIGKILL
stops it; ``--exit-code N`` makes it fail at once, as a broken node would.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from tools.client import CtlClient


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fake bus-node for tests")
    ap.add_argument("--join", required=True)
    ap.add_argument("--name", default=f"node-{os.getpid()}")
    ap.add_argument("--virtual", type=int, default=0)
    ap.add_argument("--group")
    ap.add_argument("--state-dir")
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--key-dir")  # accepted like bus-node's; the fake manager speaks plain TCP only
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--exit-code", type=int)
    opts = ap.parse_args(argv)
    if opts.exit_code is not None:
        print(f"fake node {opts.name}: failing on purpose", file=sys.stderr)
        return opts.exit_code
    stop = signal.SIGINT if opts.ignore_term else signal.SIGTERM
    if opts.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Block the stop signal before registering so it cannot be lost in between.
    signal.pthread_sigmask(signal.SIG_BLOCK, {stop, signal.SIGINT})
    names = [f"{opts.name}-{i}" for i in range(opts.virtual)] if opts.virtual else [opts.name]
    with CtlClient(opts.join, timeout=10) as client:
        client.call("fake_join", names=names, pid=os.getpid(), group=opts.group)
    print(f"fake node {opts.name}: joined as {', '.join(names)}", file=sys.stderr)
    signal.sigwait({stop, signal.SIGINT})
    return 0


if __name__ == "__main__":
    sys.exit(main())
