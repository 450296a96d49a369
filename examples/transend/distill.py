"""TranSend's image distiller and contact-sheet aggregator, on Pillow.

TranSend (Fox et al., SOSP '97) sped up web browsing over slow links by
*distilling* images: scaling them down and re-encoding them at a lower
quality, as each user's profile asked.  These are its TACC workers:

* :func:`distill` (transformation): one image in, one smaller image out.
* :func:`contact_sheet` (aggregation): several images in, one grid of
  thumbnails out.
* :func:`distill_worker` / :func:`contact_sheet_worker`: the same as TACC
  worker entry points, ``request dict -> reply dict``.

What the distiller takes care of:

* **Speed.**  When a JPEG is scaled down by 2x or more, the decoder is put in
  draft mode (:meth:`PIL.Image.Image.draft`): libjpeg then decodes straight
  to 1/2, 1/4 or 1/8 scale in the DCT domain, skipping most of the work,
  and the resampling that follows starts from an image at most 2x the
  target.  For smaller reductions draft mode would not apply, so it is not
  asked for.  ``benchmarks/test_distill_bench.py`` measures the gain.
* **Orientation.**  A camera's EXIF orientation is applied, so the output
  is upright without any metadata (EXIF is not copied to the output; the
  ICC colour profile is).
* **Modes.**  Palette, 1-bit, CMYK and 16-bit images are converted to L,
  LA, RGB or RGBA before resampling; transparency is flattened onto white
  for JPEG.
* **Never upscales**, and when an image needs no scaling and re-encoding it
  in its own format would make it larger, the original bytes are returned.
* **Hostile input.**  Only JPEG, PNG, WebP and GIF are decoded; images over
  ``max_pixels`` (decompression bombs) and anything undecodable raise
  :class:`DistillError`, a ``ValueError`` the front end maps to a client error.

No global state is touched; the functions are safe in threads and processes.
Tested in tests/examples/test_distill.py.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, fields
from typing import Any, Mapping

from PIL import Image, ImageDraw, ImageOps

from core.errors import BusError

__all__ = [
    "FORMATS",
    "CONTENT_TYPES",
    "INPUT_FORMATS",
    "MAX_PIXELS",
    "MAX_ITEMS",
    "DistillError",
    "DistillParams",
    "SheetParams",
    "distill",
    "contact_sheet",
    "distill_worker",
    "contact_sheet_worker",
]

FORMATS = ("jpeg", "png", "webp", "same")
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
MAX_PIXELS = 40_000_000  # ~ 7300 x 5500; a bomb's header claims far more
MAX_ITEMS = 64  # images in one contact sheet

_PIL_NAME = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_SAME_AS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "png"}
_FORMAT_ALIASES = {"jpg": "jpeg", "jpe": "jpeg"}
_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_WHITE = (255, 255, 255)
# What Pillow may raise on corrupt input (its own fuzzers accept the same set).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, Image.DecompressionBombError)


class DistillError(BusError, ValueError):
    """Input that cannot be distilled (not an image, too large, corrupt) or bad parameters."""


def _coerce_int(name: str, value: Any, lo: int, hi: int) -> int:
    # Query strings bring "640"; profiles bring 640.  bool is no number here.
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise DistillError(f"{name} must be an integer from {lo} to {hi}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DistillError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _coerce_format(value: Any, allowed: tuple) -> str:
    if isinstance(value, str):
        value = value.strip().lower()
        value = _FORMAT_ALIASES.get(value, value)
    if value not in allowed:
        raise DistillError(f"format must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _merge(layers) -> dict:
    merged: dict = {}
    for layer in layers:
        if layer:
            merged.update(layer)
    return merged


@dataclass(frozen=True)
class DistillParams:
    """How to distill: bounding box, lossy quality and output format (validated).

    The defaults are the profile defaults of :mod:`frontends.profiles`.
    """

    max_width: int = 800
    max_height: int = 600
    quality: int = 60
    format: str = "jpeg"

    def __post_init__(self):
        object.__setattr__(self, "max_width", _coerce_int("max_width", self.max_width, 1, 16384))
        object.__setattr__(self, "max_height", _coerce_int("max_height", self.max_height, 1, 16384))
        object.__setattr__(self, "quality", _coerce_int("quality", self.quality, 1, 100))
        object.__setattr__(self, "format", _coerce_format(self.format, FORMATS))

    @classmethod
    def from_layers(cls, *layers: Mapping[str, Any] | None) -> DistillParams:
        """Merge mappings left to right (later wins: profile, then query) and validate.

        Keys this class does not know are ignored (a profile holds other
        settings too); string values are parsed, as they come from URLs.
        """
        merged = _merge(layers)
        return cls(**{f.name: merged[f.name] for f in fields(cls) if f.name in merged})


@dataclass(frozen=True)
class SheetParams:
    """How to lay out a contact sheet: grid columns, thumbnail box side, format, quality."""

    columns: int = 4
    thumb: int = 160
    format: str = "jpeg"
    quality: int = 75

    def __post_init__(self):
        object.__setattr__(self, "columns", _coerce_int("columns", self.columns, 1, 16))
        object.__setattr__(self, "thumb", _coerce_int("thumb", self.thumb, 16, 512))
        object.__setattr__(self, "format", _coerce_format(self.format, FORMATS[:3]))
        object.__setattr__(self, "quality", _coerce_int("quality", self.quality, 1, 100))

    @classmethod
    def from_layers(cls, *layers: Mapping[str, Any] | None) -> SheetParams:
        """Like :meth:`DistillParams.from_layers`; ``format`` "same" becomes jpeg."""
        merged = _merge(layers)
        if str(merged.get("format", "")).lower() == "same":
            merged["format"] = "jpeg"
        return cls(**{f.name: merged[f.name] for f in fields(cls) if f.name in merged})


# -- decoding ------------------------------------------------------------------


def _fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """``size`` scaled to fit in ``box``, keeping the aspect ratio, never enlarged."""
    w, h = size
    scale = min(box[0] / w, box[1] / h, 1.0)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _decode(data, box: tuple[int, int], max_pixels: int) -> tuple[Image.Image, dict]:
    """Open, check, draft, load and orient an image that will be fit into ``box``.

    Returns the loaded, upright image in L, LA, RGB or RGBA and facts about
    the original.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DistillError(f"image data must be bytes, got {type(data).__name__}")
    if not len(data):
        raise DistillError("empty image data")
    try:
        im = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except Image.UnidentifiedImageError:
        raise DistillError(f"not an image in a supported format ({', '.join(INPUT_FORMATS)})") from None
    except Image.DecompressionBombWarning as e:  # escalated by a warnings filter
        raise DistillError(f"image too large to decode: {e}") from e
    except _DECODE_ERRORS as e:
        raise DistillError(f"cannot decode image: {e}") from e
    w, h = im.size
    if w * h > max_pixels:
        raise DistillError(f"image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels (decompression bomb?)")
    fmt = im.format
    icc = im.info.get("icc_profile")
    try:
        orientation = im.getexif().get(_ORIENTATION, 1) if fmt in ("JPEG", "WEBP", "PNG") else 1
    except _DECODE_ERRORS:
        orientation = 1  # a broken EXIF block is no reason to refuse the pixels
    if orientation not in range(1, 9):
        orientation = 1
    # The box in the file's own (unrotated) orientation.
    stored_box = (box[1], box[0]) if orientation in _ROTATED else box
    target = _fit((w, h), stored_box)
    draft = 1
    if fmt == "JPEG" and target[0] * 2 <= w and target[1] * 2 <= h:
        # libjpeg decodes at the largest of 1/2, 1/4, 1/8 that stays >= target.
        im.draft(None, target)
        draft = w // im.size[0]
    try:
        im.load()
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
    except _DECODE_ERRORS as e:
        raise DistillError(f"cannot decode {fmt} image: {e}") from e
    facts = {
        "original_format": _SAME_AS[fmt],
        "original_width": h if orientation in _ROTATED else w,
        "original_height": w if orientation in _ROTATED else h,
        "orientation": orientation,
        "draft": draft,
    }
    return _working_mode(im), {**facts, "icc": icc}


def _working_mode(im: Image.Image) -> Image.Image:
    """Convert to a mode that resamples correctly: L, LA, RGB or RGBA."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if mode in ("P", "PA"):
        # Resampling palette indices would blend unrelated colours.
        return im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I"):
        # 16-bit (or 32-bit int) greyscale: scale to 8 bits instead of clipping.
        return im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if mode == "F":
        return im.convert("L")
    return im.convert("RGBA" if "A" in mode or "a" in mode else "RGB")  # CMYK, YCbCr, RGBa, LAB, HSV...


def _flatten(im: Image.Image) -> Image.Image:
    """Composite transparency onto white (for JPEG)."""
    if im.mode not in ("LA", "RGBA"):
        return im
    base_mode = "L" if im.mode == "LA" else "RGB"
    bg = Image.new(base_mode, im.size, 255 if base_mode == "L" else _WHITE)
    bg.paste(im.convert(base_mode), mask=im.getchannel("A"))
    return bg


def _encode(im: Image.Image, fmt: str, quality: int, icc: bytes | None) -> bytes:
    if fmt == "jpeg":
        im = _flatten(im)
    elif fmt == "webp" and im.mode in ("L", "LA"):
        im = im.convert("RGBA" if im.mode == "LA" else "RGB")
    opts: dict = {}
    if fmt in ("jpeg", "webp"):
        opts["quality"] = quality
    if icc:
        opts["icc_profile"] = icc
    out = io.BytesIO()
    im.save(out, _PIL_NAME[fmt], **opts)
    return out.getvalue()


# -- transformation ------------------------------------------------------------


def distill(
    data: bytes,
    *,
    max_width: int = 800,
    max_height: int = 600,
    quality: int = 60,
    format: str = "jpeg",
    max_pixels: int = MAX_PIXELS,
) -> tuple[bytes, str, dict]:
    """Scale ``data`` to fit ``max_width`` x ``max_height`` and re-encode it.

    ``format`` is jpeg, png, webp or "same" (the input's; GIF becomes png);
    ``quality`` (1..100) applies to jpeg and webp.  Returns ``(bytes,
    content_type, info)``; ``info`` says what happened: original and new
    size and format, ``draft`` (the JPEG decoder's reduction factor, 1 when
    not used), ``orientation``, ``bytes_in``/``bytes_out`` and
    ``kept_original`` (True when the input was returned as is because
    nothing made it smaller).  Raises :class:`DistillError`.
    """
    p = DistillParams(max_width, max_height, quality, format)
    im, facts = _decode(data, (p.max_width, p.max_height), max_pixels)
    icc = facts.pop("icc")
    out_fmt = facts["original_format"] if p.format == "same" else p.format
    resized = False
    size = _fit(im.size, (p.max_width, p.max_height))
    if size != im.size or facts["draft"] > 1:
        # thumbnail() keeps the aspect ratio; it also reduces by an integer
        # factor first when the image is much larger than the box.
        im.thumbnail((p.max_width, p.max_height))
        resized = True
    body = _encode(im, out_fmt, p.quality, icc)
    kept = False
    if not resized and out_fmt == facts["original_format"] and len(body) >= len(data):
        body, kept = bytes(data), True
    info = {
        **facts,
        "width": im.size[0],
        "height": im.size[1],
        "format": out_fmt,
        "quality": p.quality,
        "bytes_in": len(data),
        "bytes_out": len(body),
        "kept_original": kept,
    }
    return body, CONTENT_TYPES[out_fmt], info


# -- aggregation ---------------------------------------------------------------


def _placeholder(side: int) -> Image.Image:
    tile = Image.new("RGB", (side, side), (200, 200, 200))
    draw = ImageDraw.Draw(tile)
    draw.line((0, 0, side - 1, side - 1), fill=(150, 0, 0), width=3)
    draw.line((0, side - 1, side - 1, 0), fill=(150, 0, 0), width=3)
    return tile


def _sheet(items, p: SheetParams, max_pixels: int) -> tuple[bytes, str, dict]:
    if not isinstance(items, (list, tuple)) or not items:
        raise DistillError("a contact sheet needs a non-empty list of images")
    if len(items) > MAX_ITEMS:
        raise DistillError(f"a contact sheet takes at most {MAX_ITEMS} images, got {len(items)}")
    pad, side = 4, p.thumb
    cols = min(p.columns, len(items))
    rows = -(-len(items) // cols)
    sheet = Image.new("RGB", (cols * (side + pad) + pad, rows * (side + pad) + pad), _WHITE)
    failed = []
    for i, data in enumerate(items):
        try:
            im, _ = _decode(data, (side, side), max_pixels)
            im.thumbnail((side, side))
            im = _flatten(im).convert("RGB")
        except DistillError:
            # BASE: one bad image costs its tile, not the whole sheet.
            failed.append(i)
            im = _placeholder(side)
        x = pad + (i % cols) * (side + pad) + (side - im.size[0]) // 2
        y = pad + (i // cols) * (side + pad) + (side - im.size[1]) // 2
        sheet.paste(im, (x, y))
    if len(failed) == len(items):
        raise DistillError(f"none of the {len(items)} items is a decodable image")
    body = _encode(sheet, p.format, p.quality, None)
    info = {
        "items": len(items),
        "failed": failed,
        "columns": cols,
        "rows": rows,
        "width": sheet.size[0],
        "height": sheet.size[1],
        "format": p.format,
        "bytes_out": len(body),
    }
    return body, CONTENT_TYPES[p.format], info


def contact_sheet(
    images: list[bytes],
    *,
    columns: int = 4,
    thumb: int = 160,
    format: str = "jpeg",
    quality: int = 75,
    max_pixels: int = MAX_PIXELS,
) -> bytes:
    """A grid of thumbnails (each fit in ``thumb`` x ``thumb``), ``columns`` wide.

    Images that cannot be decoded get a crossed-out tile instead of failing
    the sheet (:func:`contact_sheet_worker` lists them in ``info["failed"]``);
    :class:`DistillError` when none can be, or for bad parameters.
    """
    return _sheet(images, SheetParams(columns, thumb, format, quality), max_pixels)[0]


# -- TACC worker entry points --------------------------------------------------


def _reply(body: bytes, content_type: str, info: dict) -> dict:
    return {"data": body, "content_type": content_type, "info": info}


def distill_worker(request: Mapping[str, Any]) -> dict:
    """TACC transformation worker: ``{"data": bytes, "params": {...}}`` -> reply.

    ``params`` is what the front end merged from the user's profile and the
    query (query winning).  A request may instead carry ``profile`` and
    ``query`` separately; they are merged here as profile < params < query.
    Values may be strings (from a URL).  The reply is ``{"data",
    "content_type", "info"}``; bad input raises :class:`DistillError`.
    """
    params = DistillParams.from_layers(request.get("profile"), request.get("params"), request.get("query"))
    body, ctype, info = distill(
        request.get("data"),
        max_width=params.max_width,
        max_height=params.max_height,
        quality=params.quality,
        format=params.format,
    )
    return _reply(body, ctype, info)


def contact_sheet_worker(request: Mapping[str, Any]) -> dict:
    """TACC aggregation worker: ``{"items": [bytes, ...], "params": {...}}`` -> reply.

    Parameters (``columns``, ``thumb``, ``format``, ``quality``) merge like
    :func:`distill_worker`'s.  ``info["failed"]`` lists the indexes of items
    that were not images.
    """
    params = SheetParams.from_layers(request.get("profile"), request.get("params"), request.get("query"))
    return _reply(*_sheet(request.get("items"), params, MAX_PIXELS))
