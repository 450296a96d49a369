"""Small TACC transformations to chain with the distiller in a pipeline.

``callable="examples.transend.filters:grayscale_worker | examples.transend.distill:distill_worker"``
turns an image grey, then distills it: each stage's output is the next one's input.
"""

from __future__ import annotations

import io

__all__ = ["grayscale_worker"]


def grayscale_worker(request: dict) -> dict:
    """``{"data": image bytes}`` -> the same image in greyscale (PNG, lossless: the next stage compresses)."""
    from PIL import Image

    with Image.open(io.BytesIO(request["data"])) as im:
        grey = im.convert("L")
    out = io.BytesIO()
    grey.save(out, "PNG")
    return {"data": out.getvalue(), "content_type": "image/png", "info": {"mode": "L", "size": list(grey.size)}}
