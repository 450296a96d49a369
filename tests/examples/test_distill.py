"""The TranSend distiller and contact-sheet workers, and the test image generator."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from click.testing import CliRunner
from PIL import Image

from core.errors import BusError
from examples.transend.distill import (
    MAX_ITEMS,
    DistillError,
    DistillParams,
    SheetParams,
    contact_sheet,
    contact_sheet_worker,
    distill,
    distill_worker,
)
from tools import imagegen


def encode(im: Image.Image, fmt: str, **opts) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **opts)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def halves(size, left, right, mode="RGB") -> Image.Image:
    """An image whose left half is ``left`` and right half ``right``."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def with_orientation(im: Image.Image, orientation: int, **opts) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), **opts)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A generated 2048x1536 photo-like JPEG."""
    for index in range(64):
        name, data, facts = imagegen.make_image(3, index)
        if (facts["width"], facts["height"], facts["orientation"]) == (2048, 1536, 1):
            return data
    raise AssertionError("the generator made no 2048x1536 photo in 64 images")


# -- distill -------------------------------------------------------------------


def test_big_jpeg_is_scaled_with_draft_mode(photo):
    body, ctype, info = distill(photo, max_width=640, max_height=480, quality=50, format="jpeg")
    out = decode(body)
    assert ctype == "image/jpeg" and out.format == "JPEG"
    assert out.size == (640, 480) == (info["width"], info["height"])
    assert info["draft"] == 2  # 2048 // 640 = 3: libjpeg's 1/2 is the largest step >= the target
    assert (info["original_width"], info["original_height"], info["original_format"]) == (2048, 1536, "jpeg")
    assert info["bytes_out"] == len(body) < len(photo) / 10 and info["bytes_in"] == len(photo)
    assert not info["kept_original"]
    _, _, info = distill(photo, max_width=200, max_height=200)
    assert info["draft"] == 8 and (info["width"], info["height"]) == (200, 150)


def test_draft_not_used_below_2x():
    src = encode(Image.new("RGB", (1000, 750), (10, 120, 200)), "JPEG")
    _, _, info = distill(src, max_width=800, max_height=600)
    assert info["draft"] == 1 and (info["width"], info["height"]) == (800, 600)


def test_png_is_not_drafted_but_scaled():
    src = encode(Image.new("RGB", (900, 300), (1, 2, 3)), "PNG")
    body, ctype, info = distill(src, max_width=300, max_height=300, format="png")
    assert ctype == "image/png" and decode(body).size == (300, 100) and info["draft"] == 1


def test_never_upscales():
    src = encode(Image.new("RGB", (100, 80), (200, 30, 30)), "JPEG", quality=30)
    body, _, info = distill(src, max_width=800, max_height=600, quality=30, format="png")
    assert decode(body).size == (100, 80) and (info["width"], info["height"]) == (100, 80)


def test_original_returned_when_nothing_makes_it_smaller():
    src = encode(halves((120, 90), (255, 0, 0), (0, 0, 255)), "JPEG", quality=20)
    body, ctype, info = distill(src, max_width=800, max_height=600, quality=95, format="same")
    assert info["kept_original"] and body == src and ctype == "image/jpeg"
    assert info["bytes_out"] == len(src)
    # A lower quality does make it smaller: then the distilled version is returned.
    src = encode(halves((120, 90), (255, 0, 0), (0, 0, 255)), "JPEG", quality=95)
    body, _, info = distill(src, max_width=800, max_height=600, quality=10, format="same")
    assert not info["kept_original"] and len(body) < len(src)


def test_quality_changes_the_output(photo):
    hi, _, _ = distill(photo, max_width=800, max_height=600, quality=90)
    lo, _, _ = distill(photo, max_width=800, max_height=600, quality=15)
    assert len(lo) < len(hi) / 2


def test_exif_orientation_is_applied():
    # Orientation 6: display = stored rotated 90 degrees clockwise, so the stored
    # left half (red) ends up on top.
    src = with_orientation(halves((200, 100), (255, 0, 0), (0, 0, 255)), 6, quality=95)
    body, _, info = distill(src, max_width=800, max_height=600, format="png")
    out = decode(body).convert("RGB")
    assert out.size == (100, 200) and info["orientation"] == 6
    assert (info["original_width"], info["original_height"]) == (100, 200)
    top, bottom = out.getpixel((50, 10)), out.getpixel((50, 190))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_orientation_and_draft_together():
    src = with_orientation(Image.new("RGB", (2000, 1000), (9, 9, 9)), 6)
    _, _, info = distill(src, max_width=800, max_height=600)
    # Upright it is 1000x2000: fit into 800x600 gives 300x600; stored, that is 600x300.
    assert (info["width"], info["height"]) == (300, 600)
    assert info["draft"] == 2


def test_rgba_png_to_jpeg_flattens_on_white():
    im = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    im.paste((0, 128, 0, 255), (0, 0, 30, 40))
    body, ctype, info = distill(encode(im, "PNG"), format="jpeg", quality=95)
    out = decode(body)
    assert out.mode == "RGB" and ctype == "image/jpeg" and info["original_format"] == "png"
    assert min(out.getpixel((50, 20))) > 240  # transparent -> white
    assert out.getpixel((10, 20))[1] > 100


def test_palette_png_with_transparency_keeps_alpha_in_png():
    im = Image.new("P", (300, 200), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.paste(1, (150, 0, 300, 200))
    src = encode(im, "PNG", transparency=0)
    body, _, info = distill(src, max_width=150, max_height=150, format="png")
    out = decode(body)
    assert out.mode == "RGBA" and out.size == (150, 100)
    assert out.getpixel((10, 50))[3] == 0 and out.getpixel((140, 50))[1] == 255


def test_gif_same_becomes_png_and_webp_output():
    src = encode(Image.new("P", (64, 64), 3), "GIF")
    body, ctype, info = distill(src, format="same")
    assert ctype == "image/png" and info["format"] == "png" and decode(body).format == "PNG"
    body, ctype, _ = distill(src, format="webp", quality=50)
    assert ctype == "image/webp" and decode(body).format == "WEBP"


def test_webp_roundtrip_and_grey_to_webp():
    grey = encode(Image.new("L", (400, 400), 100), "PNG")
    body, ctype, info = distill(grey, max_width=100, max_height=100, format="webp")
    out = decode(body)
    assert out.size == (100, 100) and ctype == "image/webp"
    body, ctype, info = distill(body, format="same")
    assert ctype == "image/webp" and info["original_format"] == "webp"


def test_cmyk_jpeg_becomes_rgb():
    src = encode(Image.new("CMYK", (300, 300), (0, 255, 255, 0)), "JPEG")
    body, _, _ = distill(src, max_width=100, max_height=100)
    out = decode(body)
    assert out.mode == "RGB" and out.getpixel((50, 50))[0] > 200


def test_16bit_png_is_scaled_not_clipped():
    im = Image.new("I;16", (50, 50), 32768)
    body, _, _ = distill(encode(im, "PNG"), format="png")
    assert decode(body).convert("L").getpixel((25, 25)) in range(120, 136)


def test_bilevel_and_grey_jpeg():
    src = encode(Image.new("1", (100, 100), 1), "PNG")
    body, _, _ = distill(src, format="jpeg", max_width=50, max_height=50)
    assert decode(body).mode == "L" and decode(body).getpixel((25, 25)) > 240


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"hello, this is not an image", "not an image"),
        ("text", "must be bytes"),
        (None, "must be bytes"),
    ],
)
def test_not_images_are_refused(data, match):
    with pytest.raises(DistillError, match=match) as exc:
        distill(data)
    assert isinstance(exc.value, BusError) and isinstance(exc.value, ValueError)


def test_unsupported_format_is_refused():
    with pytest.raises(DistillError, match="supported format"):
        distill(encode(Image.new("RGB", (10, 10)), "BMP"))


def test_truncated_jpeg_is_refused(photo):
    with pytest.raises(DistillError, match="cannot decode"):
        distill(photo[: len(photo) // 2])


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_decompression_bombs_are_refused(side):
    # 10k x 10k passes Pillow's error limit but not its warning or ours;
    # 20k x 20k hits Pillow's own error.  Either way: DistillError, no allocation.
    with pytest.raises(DistillError, match="too large|exceeds|decompression"):
        distill(png_header_only(side, side))


def test_max_pixels_is_ours_to_set():
    src = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(DistillError, match="exceeds the limit of 5000"):
        distill(src, max_pixels=5000)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "quality"),
        ({"max_width": 0}, "max_width"),
        ({"max_height": True}, "max_height"),
        ({"format": "gif"}, "format"),
    ],
)
def test_bad_parameters(kw, match):
    with pytest.raises(DistillError, match=match):
        distill(encode(Image.new("RGB", (10, 10)), "PNG"), **kw)


# -- parameters and workers ----------------------------------------------------


def test_params_merge_later_layers_win_and_parse_strings():
    p = DistillParams.from_layers(
        {"max_width": 320, "quality": 40, "lang": "fr"},  # profile (unknown keys ignored)
        None,
        {"quality": "75", "format": "JPG"},  # query strings
    )
    assert p == DistillParams(max_width=320, max_height=600, quality=75, format="jpeg")
    with pytest.raises(DistillError, match="quality"):
        DistillParams.from_layers({"quality": "high"})
    assert SheetParams.from_layers({"format": "same", "columns": "3"}) == SheetParams(columns=3, format="jpeg")


def test_distill_worker_applies_profile_then_query(photo):
    request = {"data": photo, "profile": {"max_width": 320, "format": "png"}, "query": {"format": "webp"}}
    reply = distill_worker(request)
    assert set(reply) == {"data", "content_type", "info"}
    assert reply["content_type"] == "image/webp" and reply["info"]["width"] == 320
    reply = distill_worker({"data": bytearray(photo), "params": {"max_width": "100", "max_height": "100"}})
    assert decode(reply["data"]).size == (100, 75)
    with pytest.raises(DistillError):
        distill_worker({"params": {}})


def test_profile_customization_changes_the_output(photo):
    small = distill_worker({"data": photo, "params": {"max_width": 160, "max_height": 160, "quality": 30}})
    large = distill_worker({"data": photo, "params": {"max_width": 1024, "max_height": 1024, "quality": 80}})
    assert decode(small["data"]).size == (160, 120) and decode(large["data"]).size == (1024, 768)
    assert len(small["data"]) < len(large["data"])


# -- contact sheets ------------------------------------------------------------


def test_contact_sheet_grid():
    items = [encode(Image.new("RGB", (200 + 10 * i, 100), (40 * i, 0, 0)), "JPEG") for i in range(5)]
    body = contact_sheet(items, columns=2, thumb=64, format="png")
    sheet = decode(body)
    assert sheet.format == "PNG" and sheet.size == (2 * 68 + 4, 3 * 68 + 4)


def test_contact_sheet_worker_marks_bad_items(photo):
    items = [photo, b"garbage", encode(Image.new("RGBA", (50, 80), (0, 0, 255, 128)), "PNG")]
    reply = contact_sheet_worker({"items": items, "params": {"columns": 3, "thumb": 100}, "query": {"format": "webp"}})
    info = reply["info"]
    assert reply["content_type"] == "image/webp" and info["failed"] == [1]
    assert (info["columns"], info["rows"], info["items"]) == (3, 1, 3)
    assert decode(reply["data"]).size == (3 * 104 + 4, 108)


@pytest.mark.parametrize(
    "items, match",
    [
        ([], "non-empty"),
        (None, "non-empty"),
        ([b"x", b"y"], "none of the 2"),
        ([b"x"] * (MAX_ITEMS + 1), "at most"),
    ],
)
def test_contact_sheet_refusals(items, match):
    with pytest.raises(DistillError, match=match):
        contact_sheet(items)


def test_contact_sheet_bad_params():
    with pytest.raises(DistillError, match="columns"):
        contact_sheet([b"x"], columns=0)
    with pytest.raises(DistillError, match="thumb"):
        contact_sheet([b"x"], thumb=4096)


# -- the image generator -------------------------------------------------------


def test_imagegen_is_deterministic_and_varied():
    a = [imagegen.make_image(7, i) for i in range(8)]
    b = [imagegen.make_image(7, i) for i in range(8)]
    assert [x[1] for x in a] == [x[1] for x in b]
    assert imagegen.make_image(8, 0)[1] != a[0][1]
    facts = [f for _, _, f in a]
    assert {f["format"] for f in facts} == {"jpeg", "png"}
    assert {f["mode"] for f in facts if f["format"] == "png"} == {"RGBA", "P"}
    assert [f["orientation"] for f in facts].count(6) == 1
    for name, data, f in a:
        im = decode(data)
        stored = (f["height"], f["width"]) if f["orientation"] == 6 else (f["width"], f["height"])
        assert im.size == stored and name.endswith(".jpg" if f["format"] == "jpeg" else ".png")
        if f["format"] == "jpeg":
            bpp = 8 * len(data) / (f["width"] * f["height"])
            assert 0.5 < bpp < 4, bpp  # like a photograph, not flat art
            assert f["width"] * f["height"] >= 640 * 480


def test_imagegen_cli_writes_the_set_and_manifest(tmp_path):
    result = CliRunner().invoke(imagegen.main, [str(tmp_path / "set"), "--count", "4", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 images" in result.output
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["seed"] == 2 and len(manifest["images"]) == 4
    for f in manifest["images"]:
        assert (tmp_path / "set" / f["name"]).stat().st_size == f["bytes"]
    assert manifest["images"] == [f for _, _, f in imagegen.generate(2, 4)]


def test_imagegen_refuses_negative_count(tmp_path):
    result = CliRunner().invoke(imagegen.main, [str(tmp_path), "--count", "-1"])
    assert result.exit_code == 2
    with pytest.raises(ValueError):
        imagegen.write_set(tmp_path, -1)
