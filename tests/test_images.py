"""vopd.images: every image kind a dataset may hold becomes an upright 8-bit RGB image."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from vopd.images import ImageError, decode_base64_image, image_size, load_image


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels but carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_rgb_file_round_trip_keeps_pixels(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(out), arr)
    out.close()  # the result owns its pixels: still usable after the file handle is gone
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), arr)


def test_missing_file_names_path_and_where(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match=r"nope\.png.*row 7.*no such file"):
        load_image(missing, where="row 7")


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_corrupt_bytes_and_file(tmp_path):
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"this is not an image at all")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match=r"bad\.jpg.*sample 3"):
        load_image(bad, where="sample 3")


def test_truncated_png_is_refused(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(arr))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png.*(truncated|decoded)"):
        load_image(path)


def test_grayscale_becomes_equal_channels():
    arr = np.array([[0, 17, 255]], dtype=np.uint8)
    out = np.asarray(load_image(Image.fromarray(arr, mode="L")))
    assert out.shape == (1, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_rgba_and_la_composite_on_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    out = np.asarray(load_image(_png_bytes(Image.fromarray(rgba, mode="RGBA")))).astype(int)
    assert out[0, 0].tolist() == [10, 20, 30]  # opaque: unchanged
    assert out[0, 1].tolist() == [255, 255, 255]  # transparent: white
    # black at alpha 128 over white: 255 * (1 - 128/255) = 127
    assert np.all(np.abs(out[0, 2] - 127) <= 1)
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), mode="LA")
    assert np.asarray(load_image(la)).tolist() == [[[50, 50, 50], [255, 255, 255]]]


def test_palette_with_transparency_index():
    im = Image.new("P", (2, 1))
    im.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    plain = np.asarray(load_image(_png_bytes(im)))
    assert plain.tolist() == [[[200, 0, 0], [0, 200, 0]]]
    im.info["transparency"] = 1
    out = np.asarray(load_image(_png_bytes(im, transparency=1)))
    assert out.tolist() == [[[200, 0, 0], [255, 255, 255]]]


def test_16_bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)  # a 16-bit greyscale PNG
    assert Image.open(path).mode in ("I;16", "I")
    out = np.asarray(load_image(path))
    assert out[0, :, 0].tolist() == [0, 100, 255]
    # 32-bit "I" holding 16-bit values, as some TIFF readers produce.
    wide = Image.fromarray(arr.astype(np.int32), mode="I")
    assert np.asarray(load_image(wide))[0, :, 1].tolist() == [0, 100, 255]


def test_cmyk_converts_to_rgb():
    im = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    assert np.asarray(load_image(im))[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high
    arr[0, 0] = (255, 0, 0)
    arr[1, 3] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    im.save(path, exif=exif)
    out = load_image(path)
    assert out.size == (2, 4)
    assert image_size(path) == (2, 4)  # header-only size agrees with the loaded image
    np.testing.assert_array_equal(np.asarray(out), np.rot90(arr, k=-1))


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # The header claims 100 Mpx; the file holds 16 bytes of pixel data. Decoding would fail
    # or allocate 300 MB, so an ImageError about the size proves the check ran first.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own size warning must not escape either
        with pytest.raises(ImageError, match=r"bomb\.png.*10000x10000.*max_pixels=50,000,000"):
            load_image(path, max_pixels=50_000_000)
    # Far above Pillow's own hard limit: still an ImageError, not a Pillow exception.
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(_png_header_only(60_000, 60_000))


def test_max_pixels_applies_to_small_images_too():
    im = Image.new("RGB", (10, 10))
    with pytest.raises(ImageError, match="100 pixels exceeds max_pixels=99"):
        load_image(_png_bytes(im), max_pixels=99)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(im, max_pixels=99)
    assert load_image(im, max_pixels=100).size == (10, 10)


def test_base64_data_url_and_helper():
    im = Image.new("RGB", (3, 2), (1, 2, 3))
    b64 = base64.b64encode(_png_bytes(im)).decode()
    out = load_image(f"data:image/png;base64,{b64}")
    assert out.size == (3, 2) and out.getpixel((0, 0)) == (1, 2, 3)
    assert load_image(decode_base64_image(b64)).getpixel((2, 1)) == (1, 2, 3)
    with pytest.raises(ImageError, match="base64"):
        decode_base64_image("not*base64!", where="row 2")


def test_input_image_is_not_modified():
    im = Image.new("RGBA", (2, 2), (9, 9, 9, 0))
    out = load_image(im)
    assert im.mode == "RGBA" and im.getpixel((0, 0)) == (9, 9, 9, 0)
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="unsupported image source"):
        load_image(42)  # type: ignore[arg-type]
