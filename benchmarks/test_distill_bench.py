"""TranSend distillation: JPEG draft-mode decoding vs plain Pillow, same images, same run.

Run by ``make bench`` (``-m "slow or not slow" --benchmark-enable``), or
``pytest benchmarks/test_distill_bench.py -m slow --benchmark-enable -s``.

Each round distills the same generated photo-like JPEGs (1280x960 to
2048x1536, from ``tools.imagegen``) to fit 640x480 at quality 60:

* ``distill``: :func:`examples.transend.distill.distill` (draft mode to the
  target size, EXIF and mode handling included);
* ``plain``: Pillow without draft mode: open, load, ``thumbnail``, save
  (the baseline; ``thumbnail`` still uses ``reduce()`` for big factors);
* ``pillow-default``: open, ``thumbnail``, save without loading first, where
  Pillow drafts implicitly but only down to twice the target
  (``reducing_gap=2``); reported for information.

``test_draft_speedup`` prints the ratios from this run's medians and asserts
the distiller is at least ``TARGET`` times faster than the plain baseline.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from examples.transend.distill import distill
from tools import imagegen

pytestmark = pytest.mark.slow

BOX = (640, 480)
QUALITY = 60
ROUNDS = 7
# Draft decodes 1/2 to 1/4 of the pixels here (3-3.2x reductions use libjpeg's 1/2;
# 4x and more its 1/4); decoding is most of the work, so 2-3x is typical.
TARGET = 1.5
GROUP = "distill 8 JPEGs (1280x960..2048x1536) to fit 640x480"


def _photos(count: int = 8) -> list[bytes]:
    out = []
    for index in range(256):
        _, data, facts = imagegen.make_image(11, index)
        if facts["format"] == "jpeg" and facts["orientation"] == 1 and facts["width"] * facts["height"] >= 1280 * 960:
            out.append(data)
            if len(out) == count:
                return out
    raise AssertionError("the generator made too few large photos")


PHOTOS = _photos()


def _distill_all() -> list[tuple[int, int]]:
    sizes = []
    for data in PHOTOS:
        _, _, info = distill(data, max_width=BOX[0], max_height=BOX[1], quality=QUALITY, format="jpeg")
        sizes.append((info["width"], info["height"]))
    return sizes


def _pillow_all(load_first: bool) -> list[tuple[int, int]]:
    sizes = []
    for data in PHOTOS:
        im = Image.open(io.BytesIO(data))
        if load_first:
            im.load()  # a loaded image cannot be drafted any more
        im.thumbnail(BOX)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=QUALITY)
        sizes.append(im.size)
    return sizes


VARIANTS = {
    "distill": _distill_all,
    "plain": lambda: _pillow_all(load_first=True),
    "pillow-default": lambda: _pillow_all(load_first=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_distill(benchmark, medians, variant):
    fn = VARIANTS[variant]
    benchmark.group = GROUP
    sizes = benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)
    # Same work: every variant produced the same output sizes.
    assert sizes == _pillow_all(load_first=True)
    if benchmark.enabled:
        medians[("distill", variant)] = benchmark.stats.stats.median


def test_draft_speedup(medians, report_ratio):
    got = {v: medians.get(("distill", v)) for v in VARIANTS}
    if None in got.values():
        pytest.skip("needs --benchmark-enable")
    per = {v: t / len(PHOTOS) * 1e3 for v, t in got.items()}
    ratio = got["plain"] / got["distill"]
    line = (
        f"distill: {per['distill']:.1f} ms/image with draft mode, plain Pillow {per['plain']:.1f} ms "
        f"-> {ratio:.2f}x faster (target >= {TARGET}x); Pillow's default thumbnail "
        f"{per['pillow-default']:.1f} ms ({got['pillow-default'] / got['distill']:.2f}x)"
    )
    report_ratio(line)
    print(line)
    assert ratio >= TARGET, line
