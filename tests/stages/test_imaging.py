"""decode_rgb: every odd kind of image file becomes upright 8-bit RGB, or a clear rejection."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from dropkiln.stages.imaging import ImageRejected, crop_to_bucket, decode_rgb

BIG = 10**9


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header and holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def s15_fixed16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def xyz_tag(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + s15_fixed16(x) + s15_fixed16(y) + s15_fixed16(z)


def rgb_icc_profile(description: str, red: tuple, green: tuple, blue: tuple) -> bytes:
    """A minimal ICC v2 matrix/TRC display profile with the given D50 primaries."""
    text = description.encode("ascii") + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(12 + 67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0233)  # gamma 2.2
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz_tag(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz_tag(*red)),
        (b"gXYZ", xyz_tag(*green)),
        (b"bXYZ", xyz_tag(*blue)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table = body = b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (
        struct.pack(">I", offset + len(body))
        + bytes(4)
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + bytes(12)
        + b"acsp"
        + bytes(28)
        + xyz_tag(0.9642, 1.0, 0.8249)[8:]
        + bytes(48)
    )
    return header + struct.pack(">I", len(tags)) + table + body


# sRGB's primaries adapted to D50, as an ICC profile stores them.
SRGB_RED = (0.4361, 0.2225, 0.0139)
SRGB_GREEN = (0.3851, 0.7169, 0.0971)
SRGB_BLUE = (0.1431, 0.0606, 0.7141)


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def test_plain_rgb_png_is_kept_as_is() -> None:
    source = noise()
    decoded = decode_rgb(encode(source, "PNG"), BIG)
    assert (decoded.source_format, decoded.source_mode, decoded.notes) == ("PNG", "RGB", [])
    assert np.array_equal(np.asarray(decoded.image), np.asarray(source))


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (60, 40), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    decoded = decode_rgb(encode(source, "JPEG", exif=exif.tobytes()), BIG)
    assert decoded.size == (40, 60)
    assert decoded.notes == ["EXIF orientation 6 applied"]


def test_rgba_is_composited_over_white() -> None:
    source = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    source.putpixel((1, 0), (0, 0, 0, 0))
    source.putpixel((2, 0), (0, 0, 0, 128))
    decoded = decode_rgb(encode(source, "PNG"), BIG)
    assert decoded.image.mode == "RGB"
    assert [pixel(decoded.image, (x, 0)) for x in range(3)] == [
        (255, 0, 0),
        (255, 255, 255),
        (127, 127, 127),
    ]
    assert decoded.notes == ["transparent pixels composited over white"]


def test_opaque_rgba_gets_no_note() -> None:
    decoded = decode_rgb(encode(Image.new("RGBA", (4, 4), (1, 2, 3, 255)), "PNG"), BIG)
    assert (pixel(decoded.image), decoded.notes) == ((1, 2, 3), [])


def test_la_is_composited_over_white() -> None:
    source = Image.new("LA", (2, 1), (0, 255))
    source.putpixel((1, 0), (0, 0))
    decoded = decode_rgb(encode(source, "PNG"), BIG)
    assert [pixel(decoded.image, (x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 1600, 32768, 65535]], dtype=np.uint16)
    decoded = decode_rgb(encode(Image.fromarray(values), "PNG"), BIG)
    assert decoded.source_mode == "I;16"
    assert [pixel(decoded.image, (x, 0))[0] for x in range(4)] == [0, 6, 128, 255]
    assert decoded.notes == ["I;16 grayscale scaled to 8 bits"]


def test_32_bit_integer_tiff_is_read_as_16_bit_data() -> None:
    values = np.array([[0, 65535, 70000, -5]], dtype=np.int32)
    decoded = decode_rgb(encode(Image.fromarray(values), "TIFF"), BIG)
    assert decoded.source_mode == "I"
    assert [pixel(decoded.image, (x, 0))[0] for x in range(4)] == [0, 255, 255, 0]


def test_float_tiff_is_rejected() -> None:
    values = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(ImageRejected, match="mode F"):
        decode_rgb(encode(Image.fromarray(values), "TIFF"), BIG)


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = decode_rgb(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), BIG)
    assert decoded.source_mode == "CMYK"
    red, green, blue = pixel(decoded.image)
    assert red > 240 and green < 15 and blue < 15


def test_grayscale_and_bilevel_become_rgb() -> None:
    gray = decode_rgb(encode(Image.new("L", (4, 4), 77), "PNG"), BIG)
    bilevel = decode_rgb(encode(Image.new("1", (4, 4), 1), "BMP"), BIG)
    assert (pixel(gray.image), pixel(bilevel.image)) == ((77, 77, 77), (255, 255, 255))


def test_palette_with_and_without_transparency() -> None:
    opaque = Image.new("RGB", (4, 4), (10, 20, 200)).convert("P", palette=Image.Palette.ADAPTIVE)
    decoded = decode_rgb(encode(opaque, "PNG"), BIG)
    assert (decoded.source_mode, pixel(decoded.image)) == ("P", (10, 20, 200))

    transparent = Image.new("P", (2, 1), 0)
    transparent.putpalette([0, 0, 0, 255, 0, 0])
    transparent.putpixel((1, 0), 1)
    decoded = decode_rgb(encode(transparent, "PNG", transparency=0), BIG)
    assert [pixel(decoded.image, (x, 0)) for x in range(2)] == [(255, 255, 255), (255, 0, 0)]


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "GIF"), ("PNG", "PNG"), ("WEBP", "WEBP")])
def test_animated_image_uses_the_first_frame(fmt: str, name: str) -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ("red", "blue", "lime")]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = decode_rgb(data, BIG)
    red, green, blue = pixel(decoded.image, (8, 8))
    assert red > 240 and green < 15 and blue < 15
    assert decoded.notes == [f"3 frames ({name}): the first frame is used"]


def test_multipage_tiff_uses_the_first_page() -> None:
    pages = [Image.new("RGB", (8, 8), color) for color in ("lime", "red")]
    decoded = decode_rgb(encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), BIG)
    assert pixel(decoded.image) == (0, 255, 0)
    assert decoded.notes == ["2 frames (TIFF): the first frame is used"]


def test_icc_profile_colours_are_converted_to_srgb() -> None:
    # Red and blue primaries swapped: this profile's pure red is sRGB's pure blue.
    profile = rgb_icc_profile("swapped primaries", SRGB_BLUE, SRGB_GREEN, SRGB_RED)
    source = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    source.putpixel((1, 0), (255, 0, 0, 0))
    decoded = decode_rgb(encode(source, "PNG", icc_profile=profile), BIG)
    assert [pixel(decoded.image, (x, 0)) for x in range(2)] == [(0, 0, 255), (255, 255, 255)]
    assert decoded.notes == [
        "colours converted from ICC profile 'swapped primaries' to sRGB",
        "transparent pixels composited over white",
    ]


def test_unreadable_icc_profile_is_ignored_with_a_note() -> None:
    decoded = decode_rgb(encode(noise(), "PNG", icc_profile=b"not a profile"), BIG)
    assert decoded.notes == ["ICC profile unreadable: colours taken as sRGB"]


def test_srgb_profile_is_left_alone() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = noise()
    decoded = decode_rgb(encode(source, "PNG", icc_profile=profile), BIG)
    assert decoded.notes == []
    assert np.array_equal(np.asarray(decoded.image), np.asarray(source))


def test_zero_byte_file() -> None:
    with pytest.raises(ImageRejected, match=r"empty file \(0 bytes\)"):
        decode_rgb(b"", BIG)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_rejected_on_decode(fmt: str) -> None:
    data = encode(noise(), fmt)
    with pytest.raises(ImageRejected, match=f"cannot decode {fmt} data: .*truncated"):
        decode_rgb(data[: len(data) // 2], BIG)


def test_text_with_an_image_name_is_rejected() -> None:
    with pytest.raises(ImageRejected, match="not an image in a supported format"):
        decode_rgb(b"this is a text file, not a PNG\n", BIG)


def test_formats_outside_the_list_are_not_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageRejected, match="not an image in a supported format"):
        decode_rgb(eps, BIG)


def test_max_pixels_is_checked_from_the_header_before_decoding() -> None:
    # Decoding would fail (no pixel data): rejection by size proves the header was enough.
    with pytest.raises(ImageRejected, match=r"5000×4000 = 20000000 pixels is over max_pixels"):
        decode_rgb(png_header_only(5000, 4000), 10_000_000)


def test_pillow_decompression_bomb_error_is_a_rejection() -> None:
    with pytest.raises(ImageRejected, match="decompression bomb guard: Image size"):
        decode_rgb(png_header_only(20_000, 20_000), 10**12)


def test_crop_to_bucket_resizes_then_crops() -> None:
    source = Image.new("RGB", (300, 200), "red")
    source.paste((0, 0, 255), (0, 0, 150, 200))  # left half blue
    out = crop_to_bucket(source, (96, 64), (16, 0, 80, 64))
    assert out.size == (64, 64)
    assert pixel(out, (0, 32)) == (0, 0, 255)
    assert pixel(out, (63, 32)) == (255, 0, 0)
