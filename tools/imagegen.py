"""A deterministic set of photo-like test images for the TranSend demo and tests.

``python -m tools.imagegen DIR --count N --seed S`` writes N images and a
``manifest.json`` into DIR.  The same seed gives the same bytes (with the same
Pillow build), in any process.

Three of every four images are JPEG "photos" from 640x480 to 2048x1536:
a two-colour gradient lit by a radial vignette, soft shapes, then grain at
two scales, so that they compress like noisy camera pictures (about 2 bits
per pixel at quality 85) rather than like flat synthetic art.  Every eighth
image is stored sideways with EXIF orientation 6, as phones do (its facts
give the upright size).  The fourth of every four is a PNG "graphic" up to
1024x768, RGBA with transparency or palette (P) mode, to exercise mode
conversions.

Pillow is imported only when images are made, so importing this module (e.g.
from a CLI that lists tools) stays light.  Tested in tests/examples/test_distill.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import click

__all__ = ["PHOTO_SIZES", "GRAPHIC_SIZES", "make_image", "generate", "write_set", "main"]

PHOTO_SIZES = ((640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536))
GRAPHIC_SIZES = ((640, 480), (800, 600), (1024, 768))
JPEG_QUALITY = 85
_ORIENTATION = 0x0112


def _colour(rng: random.Random, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))


def _noise(rng: random.Random, size: tuple[int, int], amplitude: int):
    """Grey noise in [0, amplitude] as an L image (from the seeded generator, not C's rand)."""
    from PIL import Image

    w, h = size
    plane = Image.frombytes("L", (w, h), rng.randbytes(w * h))
    return plane.point(lambda v: v * amplitude // 255)


def _shapes(rng: random.Random, size: tuple[int, int], count: int, alpha: tuple[int, int]):
    """An RGBA layer of random ellipses, rectangles and polygons."""
    from PIL import Image, ImageDraw

    w, h = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(count):
        fill = _colour(rng) + (rng.randint(*alpha),)
        x0, y0 = rng.randrange(-w // 4, w), rng.randrange(-h // 4, h)
        x1, y1 = x0 + rng.randint(w // 20, w // 2), y0 + rng.randint(h // 20, h // 2)
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pts = [(rng.randint(x0, x1), rng.randint(y0, y1)) for _ in range(rng.randint(3, 7))]
            draw.polygon(pts, fill=fill)
    return layer


def _photo(rng: random.Random, size: tuple[int, int]):
    from PIL import Image, ImageChops, ImageFilter, ImageOps

    w, h = size
    grad = Image.linear_gradient("L").resize(size)
    if rng.random() < 0.5:
        grad = grad.transpose(Image.Transpose.ROTATE_180)
    im = ImageOps.colorize(grad, _colour(rng, 0, 160), _colour(rng, 90, 255)).convert("RGBA")
    im.alpha_composite(_shapes(rng, size, rng.randint(8, 20), (90, 255)))
    im = im.convert("RGB").filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5)))
    # Lighting: a vignette darkening the corners.
    light = Image.radial_gradient("L").resize(size).point(lambda v: 255 - v * 3 // 5)
    im = ImageChops.multiply(im, Image.merge("RGB", (light, light, light)))
    # Texture at two scales: blotches (foliage, fabric) and sensor grain.
    coarse = _noise(rng, (w // 8, h // 8), 48).resize(size, Image.Resampling.BICUBIC)
    fine = _noise(rng, size, 24)
    grain = ImageChops.add(coarse, fine)
    return ImageChops.add(im, Image.merge("RGB", (grain, grain, grain)), offset=-36)


def _graphic(rng: random.Random, size: tuple[int, int], palette: bool):
    from PIL import Image

    im = Image.new("RGBA", size, (255, 255, 255, 0) if not palette else _colour(rng) + (255,))
    im.alpha_composite(_shapes(rng, size, rng.randint(6, 14), (255, 255)))
    if palette:
        return im.convert("RGB").quantize(colors=64, dither=Image.Dither.NONE)
    return im


def make_image(seed: int, index: int) -> tuple[str, bytes, dict]:
    """Image ``index`` of the set for ``seed``: ``(file name, encoded bytes, facts)``."""
    from PIL import Image

    rng = random.Random(f"snsbus-imagegen:{seed}:{index}")
    if index % 4 == 3:
        palette = index % 8 == 7
        size = rng.choice(GRAPHIC_SIZES)
        im = _graphic(rng, size, palette)
        name, fmt, opts = f"img{index:04d}_{size[0]}x{size[1]}.png", "PNG", {}
        orientation = 1
    else:
        size = rng.choice(PHOTO_SIZES)
        if rng.random() < 0.2:
            size = size[::-1]  # portrait
        im = _photo(rng, size)
        orientation = 6 if index % 8 == 6 else 1
        opts = {"quality": JPEG_QUALITY}
        if orientation != 1:
            # Stored sideways; a viewer rotating by EXIF shows it upright.
            im = im.transpose(Image.Transpose.ROTATE_90)
            exif = Image.Exif()
            exif[_ORIENTATION] = orientation
            opts["exif"] = exif.tobytes()
        name, fmt = f"img{index:04d}_{size[0]}x{size[1]}.jpg", "JPEG"
    out = io.BytesIO()
    im.save(out, fmt, **opts)
    data = out.getvalue()
    facts = {
        "name": name,
        "format": fmt.lower(),
        "mode": im.mode,
        "width": size[0],
        "height": size[1],
        "orientation": orientation,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return name, data, facts


def generate(seed: int, count: int):
    """Yield ``(name, bytes, facts)`` for images 0..count-1 of the set for ``seed``."""
    for index in range(count):
        yield make_image(seed, index)


def write_set(directory: str | Path, count: int, seed: int = 0) -> list[dict]:
    """Write ``count`` images and ``manifest.json`` (the list of facts) into ``directory``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, data, facts in generate(seed, count):
        (root / name).write_bytes(data)
        manifest.append(facts)
    (root / "manifest.json").write_text(json.dumps({"seed": seed, "images": manifest}, indent=1) + "\n")
    return manifest


@click.command(name="imagegen")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", "-n", default=24, show_default=True, type=click.IntRange(min=0), help="Images to write.")
@click.option("--seed", "-s", default=0, show_default=True, type=int, help="Same seed, same images.")
def main(directory: Path, count: int, seed: int) -> None:
    """Write COUNT deterministic photo-like JPEGs and PNGs into DIRECTORY."""
    try:
        manifest = write_set(directory, count, seed)
    except OSError as e:
        raise click.ClickException(f"cannot write images to {directory}: {e}; check the path and free space") from e
    total = sum(m["bytes"] for m in manifest)
    click.echo(f"wrote {len(manifest)} images ({total / 1e6:.1f} MB) and manifest.json to {directory}")


if __name__ == "__main__":
    main()
