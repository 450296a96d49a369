"""A small origin web server for the TranSend demo and tests: one directory of images over HTTP.

``python -m examples.transend.origin DIR --port P`` serves every regular file
directly inside DIR (e.g. the set written by ``python -m tools.imagegen DIR``,
with its ``manifest.json``) at ``/NAME``.  Names with a slash, a leading dot or
anything that resolves outside DIR are 404; only GET and HEAD are served.
``GET /`` lists the files as JSON.  ``--delay`` adds a fixed latency per
request, to play a slow origin.  SIGTERM/SIGINT stop it cleanly.

Library use: :func:`make_app` gives the aiohttp application (tests run it on
an ephemeral port with ``aiohttp.test_utils.TestServer``).
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import sys
from pathlib import Path

import click
from aiohttp import web

__all__ = ["make_app", "main"]

log = logging.getLogger(__name__)

_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
          ".gif": "image/gif", ".json": "application/json"}  # fmt: skip


def _content_type(path: Path) -> str:
    return _TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def make_app(directory: str | Path, *, delay: float = 0.0) -> web.Application:
    """An application serving the files of ``directory`` (not its subdirectories)."""
    root = Path(directory).resolve()
    if not root.is_dir():
        raise ValueError(f"{directory} is not a directory")

    async def index(request: web.Request) -> web.Response:
        names = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        return web.json_response({"files": names})

    async def file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if delay:
            await asyncio.sleep(delay)
        path = (root / name).resolve()
        if name.startswith(".") or path.parent != root or not path.is_file():
            raise web.HTTPNotFound(text=f"no file {name!r} here\n")
        return web.FileResponse(path, headers={"Content-Type": _content_type(path), "Cache-Control": "max-age=3600"})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/{name}", file)
    return app


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any).")
@click.option("--delay", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds added per request.")
def main(directory: Path, host: str, port: int, delay: float) -> None:
    """Serve the files of DIRECTORY over HTTP until SIGTERM/SIGINT."""
    import signal

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s origin[%(process)d]: %(message)s")  # fmt: skip

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(make_app(directory, delay=delay), access_log=None)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as e:
                log.error("cannot listen on %s:%d: %s", host, port, e)
                return 1
            bound = runner.addresses[0][1] if runner.addresses else port
            log.info("serving %s on http://%s:%d", directory, host, bound)
            await stop.wait()
        finally:
            await runner.cleanup()
        return 0

    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
