"""Hostile and malformed requests for the fuzz test (tests/test_fuzz.py) and the soak (bench/soak.py).

Every case is deterministic: `fuzz_case(seed, index)` always builds the same bytes, so a failure
reproduces from the (seed, index) pair printed with it. A case is a raw HTTP body plus headers, so
broken multipart and JSON bodies go out exactly as built (requests would repair them otherwise).
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image
from urllib3.filepost import encode_multipart_formdata

from segserve.tools.synthetic import generate_scene

ANY = "200 or 4xx"  # mutated bytes may still decode (a bit flip in pixel data is still an image)
# Malformed multipart part headers and url-encoding: TorchServe's frontend (Netty's form decoder) refuses
# them before any worker sees them, with a 500 of this type. Nothing in the handler can change that; see
# docs/resilience.md. Any other 5xx still fails.
FRONTEND = "200, 4xx or the frontend's 500 ErrorDataDecoderException"
FRONTEND_DECODER_ERROR = "ErrorDataDecoderException"
FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
MEDIA = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "TIFF": "image/tiff", "BMP": "image/bmp",
         "GIF": "image/gif"}
# Over the handler's max_pixels (40 M) by far, and within each format's own field width.
HUGE = ((60000, 60000), (65535, 1000), (1000, 65535), (16383, 16383))


@dataclass
class Case:
    """One request: `expect` is the set of statuses it may get (ANY: 200 or any 4xx; FRONTEND: see above)."""

    name: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    expect: frozenset[int] | str = ANY

    def allows(self, status: int, error_type: str | None = None) -> bool:
        if self.expect in (ANY, FRONTEND):
            return (status == 200 or 400 <= status < 500
                    or (self.expect == FRONTEND and status == 500 and error_type == FRONTEND_DECODER_ERROR))
        return status in self.expect


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


@cache
def valid_images() -> dict[str, list[bytes]]:
    """Small scenes in every format, two sizes each: the seeds of the mutations."""
    images = {}
    for fmt in FORMATS:
        images[fmt] = []
        for seed, size in ((1, (48, 64)), (2, (90, 70))):
            pixels, _ = generate_scene(seed, size)
            image = Image.fromarray(pixels)
            images[fmt].append(encode(image.convert("P") if fmt == "GIF" else image, fmt))
    return images


def scene(rng: random.Random) -> tuple[str, bytes]:
    fmt = rng.choice(FORMATS)
    return fmt, rng.choice(valid_images()[fmt])


# -- huge declared dimensions: valid headers, bodies that would be gigapixel images ------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + png_chunk(b"IEND", b""))


def huge_jpeg(data: bytes, width: int, height: int) -> bytes:
    for marker in (b"\xff\xc0", b"\xff\xc2"):  # baseline or progressive start of frame
        at = data.find(marker)
        if at >= 0:
            return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]
    raise ValueError("no SOF marker")


def huge_gif(data: bytes, width: int, height: int) -> bytes:
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def huge_bmp(data: bytes, width: int, height: int) -> bytes:
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def huge_webp(data: bytes, width: int, height: int) -> bytes:
    at = data.find(b"\x9d\x01\x2a")  # VP8 key frame start code, then 14-bit width and height
    if at < 0:
        raise ValueError("no VP8 key frame")
    # 14 bits: at most 16383 a side, so always the largest (268 M pixels) to be over max_pixels.
    return data[:at + 3] + struct.pack("<HH", 16383, 16383) + data[at + 7:]


def huge_tiff(data: bytes, width: int, height: int) -> bytes:
    """Patch ImageWidth (256) and ImageLength (257) in the first IFD of a little-endian TIFF."""
    out = bytearray(data)
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            if kind == 3:  # SHORT
                struct.pack_into("<HH", out, entry + 2, 4, 1)  # make it a LONG to hold any size
            struct.pack_into("<I", out, entry + 8, value)
    return bytes(out)


HUGE_PATCHERS: dict[str, Callable[[bytes, int, int], bytes]] = {
    "JPEG": huge_jpeg, "GIF": huge_gif, "BMP": huge_bmp, "WEBP": huge_webp, "TIFF": huge_tiff,
    "PNG": lambda _data, width, height: huge_png(width, height),
}


# -- valid files that are expensive to serve: each must meet a limit (docs/resilience.md) -------------------
def zero_png(width: int, height: int, mode: str = "L") -> bytes:
    """A complete PNG of zeros (8-bit gray, or 1-bit with mode "1"), compressed a band at a time: a 1 x 40,000,000
    image is ~80 MB of rows but ~80 KB of file."""
    depth, row_bytes = (1, -(-width // 8)) if mode == "1" else (8, width)
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + row_bytes)  # filter byte, pixels
    band = max(1, (1 << 22) // len(row))
    parts = [packer.compress(row * min(band, height - top)) for top in range(0, height, band)]
    data = b"".join(parts) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def ico_holding(png: bytes) -> bytes:
    """An ICO file whose one entry is `png` (ICO keeps PNGs whole; Pillow decodes the entry inside Image.open)."""
    width, height = struct.unpack_from(">II", png, 16)  # IHDR's; an entry says 0 for 256 and more
    entry = struct.pack("<BBBBHHII", width if width < 256 else 0, height if height < 256 else 0, 0, 0, 1, 32,
                        len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def many_scans_jpeg(scans: int, size: tuple[int, int] = (2048, 2048)) -> bytes:
    """A progressive JPEG of a flat image whose last scan (an AC refinement: a dozen bytes, all end-of-band runs)
    is repeated until it has `scans` scans: libjpeg decodes each one over every block of the image, and Pillow
    tells nothing of them before decoding. 2000 scans of 2048 x 2048 are 57 KB."""
    data = encode_with(Image.new("RGB", size, (120, 130, 140)), "JPEG", progressive=True, quality=90)
    last, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    have = data.count(b"\xff\xda")
    return data[:end] + data[last:end] * max(0, scans - have) + data[end:]


def many_strips_tiff(strips: int) -> bytes:
    """An uncompressed 1-pixel-wide gray TIFF of `strips` rows, one strip per row: Pillow makes a decoder call
    per strip (400,000 strips are 3.6 MB). Written by hand: Pillow's writer picks its own strip size."""
    tags = [(256, 4, 1, 1), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, strips, None), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, strips, None)]
    ifd_size = 2 + 12 * len(tags) + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * strips
    data_at = counts_at + 4 * strips
    ifd = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        value = {273: offsets_at, 279: counts_at}.get(tag, value)
        ifd += struct.pack("<HHII", tag, kind, count, value) if kind == 4 else struct.pack("<HHIHH", tag, kind,
                                                                                              count, value, 0)
    offsets = np.arange(data_at, data_at + strips, dtype="<u4").tobytes()
    counts = np.ones(strips, dtype="<u4").tobytes()
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + offsets + counts + b"\x80" * strips


def encode_with(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def other_format(fmt: str, seed: int = 0) -> bytes:
    """A small valid image in a format Pillow reads but segserve does not accept by default (415)."""
    pixels, _ = generate_scene(seed, (48, 64))
    image = Image.fromarray(pixels)
    if fmt == "ICO":
        return ico_holding(encode_with(image, "PNG"))
    return encode_with(image.convert("RGBA") if fmt == "ICNS" else image, fmt)


def lattice_png(width: int, height: int) -> bytes:
    """An RGB checkerboard of single pixels, red and blue: the mask that makes contour tracing slowest (a hole at
    every other pixel) when a model answers the brightest channel."""
    y, x = np.indices((height, width))
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.where((x + y) % 2 == 0, 255, 0)
    pixels[..., 2] = 255 - pixels[..., 0]
    return encode_with(Image.fromarray(pixels), "PNG")


def noise_image(width: int, height: int, seed: int = 0, fmt: str = "PNG", **params) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode_with(Image.fromarray(pixels), fmt, **params)


def url_encoded_fields(count: int) -> bytes:
    """A form of `count` empty fields with distinct names: 400,000 of them are ~3.5 MB."""
    return b"&".join(b"f%d=" % index for index in range(count))


# -- mutations of valid images ---------------------------------------------------------------------------
def bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    # Half the time in the first 64 bytes, where the headers (dimensions, modes, chunk lengths) live.
    span = min(len(out), 64) if rng.random() < 0.5 else len(out)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(out)


def byte_edits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out))
        action = rng.choice(("overwrite", "insert", "delete", "duplicate"))
        chunk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
        if action == "overwrite":
            out[at:at + len(chunk)] = chunk
        elif action == "insert":
            out[at:at] = chunk
        elif action == "delete":
            del out[at:at + rng.randint(1, 64)]
        else:
            out[at:at] = out[at:at + rng.randint(1, 256)]
    return bytes(out)


def random_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


# -- request bodies --------------------------------------------------------------------------------------
def multipart(fields: dict[str, tuple[str, bytes, str] | str], boundary: str = "segserve-fuzz") -> tuple[bytes, str]:
    return encode_multipart_formdata(fields, boundary=boundary)


def raw(name: str, body: bytes, content_type: str | None, expect: frozenset[int] | str = ANY,
        **headers: str) -> Case:
    if content_type is not None:
        headers["Content-Type"] = content_type
    return Case(name, body, headers, expect)


BAD = frozenset({400})
TOO_LARGE = frozenset({413})
UNSUPPORTED = frozenset({415})
OK = frozenset({200})


def case_truncated(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    cut = rng.randint(0, len(data) - 1)
    return raw(f"truncated {fmt} at {cut}/{len(data)}", data[:cut], rng.choice((MEDIA[fmt], None)))


def case_bit_flips(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    return raw(f"bit flips in {fmt}", bit_flips(rng, data), MEDIA[fmt])


def case_byte_edits(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    return raw(f"byte edits in {fmt}", byte_edits(rng, data), "application/octet-stream")


def case_huge(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    width, height = (16383, 16383) if fmt == "WEBP" else rng.choice(HUGE)
    body = HUGE_PATCHERS[fmt](data, width, height)
    return raw(f"{fmt} declaring {width}x{height}", body, rng.choice((MEDIA[fmt], "application/octet-stream")),
               TOO_LARGE)


def case_huge_in_multipart(rng: random.Random) -> Case:
    width, height = rng.choice(HUGE)
    body, content_type = multipart({"data": ("bomb.png", huge_png(width, height), "image/png"), "format": "png"})
    return raw(f"multipart PNG declaring {width}x{height}", body, content_type, TOO_LARGE)


def case_truncated_within_limits(rng: random.Random) -> Case:
    # Declares 2000x2000 (inside max_pixels) but carries almost no pixel data: must be a 400, fast.
    return raw("PNG declaring 2000x2000 with 4 KB of pixels", huge_png(2000, 2000)[:-12], "image/png", BAD)


def case_random(rng: random.Random) -> Case:
    size = rng.choice((1, 7, 64, 512, 4096))
    prefix = rng.choice((b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                         b"RIFF\x00\x00\x00\x00WEBPVP8 "))
    body = prefix + random_bytes(rng, size)
    return raw(f"random {size} bytes after {prefix[:8]!r}", body, rng.choice(("application/octet-stream", None)))


def case_wrong_content_type(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    declared = rng.choice(("text/plain", "text/html; charset=utf-8", "application/xml", "video/mp4",
                           "application/pdf"))
    # TorchServe decodes text/* bodies to str and passes other types as bytes: both must be a 415.
    return raw(f"{fmt} sent as {declared}", data, declared, UNSUPPORTED)


def case_image_declared_json(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    return raw(f"{fmt} sent as application/json", data, "application/json", BAD)


def case_empty(rng: random.Random) -> Case:
    declared = rng.choice((None, "image/png", "application/octet-stream", "application/json",
                           "multipart/form-data; boundary=x"))
    return raw(f"empty body as {declared}", b"", declared, frozenset({400}))


JSON_BODIES: list[tuple[str, Callable[[random.Random], bytes]]] = [
    ("truncated JSON", lambda rng: json.dumps({"image": "iVBORw0KGgo" * 8}).encode()[:rng.randint(1, 60)]),
    ("JSON array", lambda rng: b"[1, 2, 3]"),
    ("JSON string", lambda rng: b'"iVBORw0KGgo="'),
    ("JSON number", lambda rng: b"42"),
    ("JSON null", lambda rng: b"null"),
    ("image is a number", lambda rng: b'{"image": 12345}'),
    ("image is a list", lambda rng: b'{"image": ["a", "b"]}'),
    ("image is an object", lambda rng: b'{"image": {"data": "x"}}'),
    ("image is empty", lambda rng: b'{"image": ""}'),
    ("no image key", lambda rng: b'{"picture": "iVBORw0KGgo="}'),
    ("bad base64", lambda rng: json.dumps({"image": "not*base64!" + "A" * rng.randint(0, 9)}).encode()),
    ("base64 of random bytes", lambda rng: json.dumps({"image": base64.b64encode(rng.randbytes(300)).decode()})
     .encode()),
    ("broken data URL", lambda rng: b'{"image": "data:image/png;base64,%%%"}'),
    ("invalid UTF-8", lambda rng: b'{"image": "\xff\xfe\xfa"}'),
    ("deeply nested", lambda rng: b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("duplicate keys", lambda rng: b'{"image": "AAAA", "image": 5}'),
]


def case_malformed_json(rng: random.Random) -> Case:
    name, make = rng.choice(JSON_BODIES)
    return raw(f"JSON body: {name}", make(rng), "application/json", BAD)


BAD_OPTIONS = [
    {"format": "gif"}, {"format": ""}, {"format": "PNG\u0000"}, {"format": "x" * 500},
    {"classes": "unicorn"}, {"classes": "99"}, {"classes": "-1"}, {"classes": ",,,"},
    {"min_area": "-5"}, {"min_area": "abc"}, {"min_area": "1e999"}, {"min_area": "12.5"},
    {"tile": "maybe"}, {"tile": "ON AND OFF"},
]  # An empty tile/classes/min_area means the default, and a huge min_area is a number: those are 200s.


def case_bad_option(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    options = rng.choice(BAD_OPTIONS)
    if rng.random() < 0.5:
        doc = {"image": base64.b64encode(data).decode(), **options}
        return raw(f"JSON body with {options}", json.dumps(doc).encode(), "application/json", BAD)
    body, content_type = multipart({"data": (f"a.{fmt.lower()}", data, MEDIA[fmt]), **options})
    return raw(f"multipart with {options}", body, content_type, BAD)


def case_json_option_types(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    options = rng.choice(({"format": 5}, {"format": ["png"]}, {"classes": {"a": 1}}, {"min_area": [1]},
                          {"tile": 3}, {"min_area": True}))
    doc = {"image": base64.b64encode(data).decode(), **options}
    return raw(f"JSON option of the wrong type {options}", json.dumps(doc).encode(), "application/json", BAD)


def case_malformed_multipart(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    body, content_type = multipart({"data": (f"a.{fmt.lower()}", data, MEDIA[fmt]), "format": "png"})
    kind = rng.choice(("no boundary", "wrong boundary", "truncated", "no closing boundary", "garbage",
                       "empty file", "no image field", "two image fields", "text field as image"))
    if kind == "no boundary":
        content_type = "multipart/form-data"
    elif kind == "wrong boundary":
        content_type = "multipart/form-data; boundary=not-the-one"
    elif kind == "truncated":
        body = body[:rng.randint(1, len(body) - 1)]
    elif kind == "no closing boundary":
        body = body[:body.rfind(b"--segserve-fuzz--")]
    elif kind == "garbage":
        body = rng.randbytes(rng.randint(1, 2048))
    elif kind == "empty file":
        body, content_type = multipart({"data": ("a.png", b"", "image/png")})
    elif kind == "no image field":
        body, content_type = multipart({"format": "png", "classes": "cell"})
    elif kind == "two image fields":
        body, content_type = multipart({"data": ("a.png", data, MEDIA[fmt]), "file": ("b.png", data, MEDIA[fmt])})
    else:
        body, content_type = multipart({"data": "just some text, not an image"})
    return raw(f"multipart {kind} ({fmt})", body, content_type)


def case_form_urlencoded(rng: random.Random) -> Case:
    body = rng.choice((b"image=abc&format=png", b"format=png", b"data=abc%20def", b"a" * 3000))
    return raw("form-urlencoded body", body, "application/x-www-form-urlencoded")


PART = b'Content-Disposition: form-data; name="data"; filename="a.png"\r\nContent-Type: image/png\r\n'
BROKEN_FORMS: list[tuple[str, bytes, str]] = [
    ("url-encoding %%%", b"%%%=%%%", "application/x-www-form-urlencoded"),
    ("url-encoding with a bad hex byte", b"data=%zz%01", "application/x-www-form-urlencoded"),
    ("url-encoding with empty names", b"=&=&", "application/x-www-form-urlencoded"),
    ("part without Content-Disposition", b"--xx\r\nContent-Type: image/png\r\n\r\nabc\r\n--xx--\r\n",
     "multipart/form-data; boundary=xx"),
    ("part without a name", b"--xx\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--xx--\r\n",
     "multipart/form-data; boundary=xx"),
    ("part with an unknown charset", b'--xx\r\nContent-Disposition: form-data; name="format"\r\n'
     b"Content-Type: text/plain; charset=nope-9\r\n\r\npng\r\n--xx--\r\n", "multipart/form-data; boundary=xx"),
    ("part with an unknown transfer encoding", b"--xx\r\n" + PART + b"Content-Transfer-Encoding: base64x\r\n"
     b"\r\nabc\r\n--xx--\r\n", "multipart/form-data; boundary=xx"),
    ("part header of binary garbage", b"--xx\r\n\xff\xfe: \x00\x01\r\n\r\nabc\r\n--xx--\r\n",
     "multipart/form-data; boundary=xx"),
    ("form with an unknown charset", b"--xx\r\n" + PART + b"\r\nabc\r\n--xx--\r\n",
     "multipart/form-data; boundary=xx; charset=nope"),
]


def case_broken_form_encoding(rng: random.Random) -> Case:
    name, body, content_type = rng.choice(BROKEN_FORMS)
    return raw(f"form: {name}", body, content_type, FRONTEND)


def case_odd_accept(rng: random.Random) -> Case:
    fmt, data = scene(rng)
    accept = rng.choice(("text/html", "*/*", "image/*", "application/x-npy;q=0.1, image/png",
                         "application/json, image/jpeg", "\u00e9\u00e8", "image/png" * 50))
    return raw(f"{fmt} with Accept {accept[:30]!r}", data, MEDIA[fmt], ANY, Accept=accept)


def case_valid(rng: random.Random) -> Case:
    """A good request among the bad: it must still be answered 200."""
    fmt, data = scene(rng)
    return raw(f"valid {fmt}", data, MEDIA[fmt], frozenset({200}))


# -- expensive but valid files: each meets its limit (docs/resilience.md), or is served when within them ----
@cache
def expensive_bodies() -> dict[str, tuple[bytes, dict[str, str], frozenset[int]]]:
    """name -> (body, headers, the statuses it must get): small enough to send hundreds of times."""
    octet = {"Content-Type": "application/octet-stream"}
    noise = noise_image(128, 128)
    polygons, polygons_type = multipart({"data": ("noise.png", noise, "image/png"), "format": "polygons",
                                         "tile": "on"})
    overlay, overlay_type = multipart({"data": ("noise.jpg", noise_image(1000, 800, fmt="JPEG", quality=40),
                                                "image/jpeg"), "format": "overlay", "tile": "off"})
    v2_big = json.dumps({"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                     "data": [base64.b64encode(zero_png(6000, 5000)).decode()]}]}).encode()
    return {
        "ICO holding a 13000 x 13000 PNG": (ico_holding(zero_png(13000, 13000, "1")), octet, UNSUPPORTED),
        "JPEG 2000": (other_format("JPEG2000"), octet, UNSUPPORTED),
        "QOI": (other_format("QOI"), octet, UNSUPPORTED),
        "progressive JPEG of 300 scans": (many_scans_jpeg(300, (512, 512)), octet, TOO_LARGE),
        "progressive JPEG of 40 scans (within the limit)": (many_scans_jpeg(40, (256, 256)), octet, OK),
        "TIFF of 60,000 strips": (many_strips_tiff(60_000), octet, TOO_LARGE),
        "TIFF of 2,000 strips (within the limit)": (many_strips_tiff(2_000), octet, OK),
        "PNG 1 x 2,000,000 (10,417 windows)": (zero_png(1, 2_000_000), octet, TOO_LARGE),
        "PNG 200,000 x 200 (tiled band memory)": (zero_png(200_000, 200), octet, TOO_LARGE),
        "v2 JSON tensor of 30 Mpx": (v2_big, {"Content-Type": "application/json"}, TOO_LARGE),
        "polygons of noise 128 x 128, tiled (within the limits)": (polygons, {"Content-Type": polygons_type}, OK),
        "overlay of a 1000 x 800 photo (within the limits)": (overlay, {"Content-Type": overlay_type}, OK),
        "url-encoded form of 20,000 empty fields": (url_encoded_fields(20_000),
                                                    {"Content-Type": "application/x-www-form-urlencoded"}, BAD),
    }


def case_expensive(rng: random.Random) -> Case:
    name, (body, headers, expect) = rng.choice(sorted(expensive_bodies().items()))
    return Case(f"expensive: {name}", body, dict(headers), expect)


def case_expensive_refused(rng: random.Random) -> Case:
    """The expensive cases whose answer is always a 4xx (the soak's bad requests)."""
    refused = sorted((name, case) for name, case in expensive_bodies().items() if 200 not in case[2])
    name, (body, headers, expect) = rng.choice(refused)
    return Case(f"expensive: {name}", body, dict(headers), expect)


# -- v2 (Open Inference Protocol) bodies with fields of the wrong kind --------------------------------------
V2_BAD_FIELDS: list[tuple[str, Callable[[dict], None]]] = [
    ('"parameters": [1]', lambda doc: doc.update(parameters=[1])),
    ('"parameters": "x"', lambda doc: doc.update(parameters="x")),
    ('"outputs": 5', lambda doc: doc.update(outputs=5)),
    ('"outputs": [5]', lambda doc: doc.update(outputs=[5])),
    ('"outputs": {"name": "mask"}', lambda doc: doc.update(outputs={"name": "mask"})),
    ("an output's parameters [1]", lambda doc: doc.update(outputs=[{"name": "mask", "parameters": [1]}])),
    ('"id": 5', lambda doc: doc.update(id=5)),
    ('"id": []', lambda doc: doc.update(id=[])),
    ("an id of 10,000 characters", lambda doc: doc.update(id="x" * 10_000)),
    ('"binary_data_output": "yes"', lambda doc: doc.update(parameters={"binary_data_output": "yes"})),
    ('"format": 5', lambda doc: doc.update(parameters={"format": 5})),
    ('"format": "gif"', lambda doc: doc.update(parameters={"format": "gif"})),
    ('"classes": "²"', lambda doc: doc.update(parameters={"classes": "²"})),
    ('"classes": "9" x 5000', lambda doc: doc.update(parameters={"classes": "9" * 5000})),
    ("unknown parameter", lambda doc: doc.update(parameters={"colour": "red"})),
    ("input parameters [1]", lambda doc: doc["inputs"][0].update(parameters=[1])),
    ('"binary_data_size": -1', lambda doc: doc["inputs"][0].update(parameters={"binary_data_size": -1})),
    ('"binary_data_size": "5"', lambda doc: doc["inputs"][0].update(parameters={"binary_data_size": "5"})),
    ('"shape": [true]', lambda doc: doc["inputs"][0].update(shape=[True])),
    ('"shape": [2 ** 70]', lambda doc: doc["inputs"][0].update(shape=[2 ** 70])),
    ('"shape": "1"', lambda doc: doc["inputs"][0].update(shape="1")),
    ('"shape": [2]', lambda doc: doc["inputs"][0].update(shape=[2])),
    ('"datatype": 5', lambda doc: doc["inputs"][0].update(datatype=5)),
    ('"datatype": "FP32"', lambda doc: doc["inputs"][0].update(datatype="FP32")),
    ('"data": 5', lambda doc: doc["inputs"][0].update(data=5)),
    ("two inputs", lambda doc: doc.update(inputs=doc["inputs"] * 2)),
    ("an input that is a string", lambda doc: doc.update(inputs=["image"])),
]
V2_HEADER_LENGTHS = ("²", "-1", "9" * 40, "", "0x10", "1e3", "1 2", "\u00b9\u00b2")  # Latin-1, as HTTP headers are


def v2_doc(rng: random.Random) -> tuple[dict, bytes]:
    fmt, data = scene(rng)
    return {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(data).decode()]}]}, data


def case_v2_bad_field(rng: random.Random) -> Case:
    doc, _ = v2_doc(rng)
    name, mutate = rng.choice(V2_BAD_FIELDS)
    mutate(doc)
    return raw(f"v2 {name}", json.dumps(doc).encode(), rng.choice(("application/json", None)),
               frozenset({400, 422}))


def case_v2_header_length(rng: random.Random) -> Case:
    _, data = v2_doc(rng)
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data) + 4}}]}).encode()
    length = rng.choice(V2_HEADER_LENGTHS)
    return raw(f"v2 binary body, Inference-Header-Content-Length {length[:12]!r}",
               head + struct.pack("<I", len(data)) + data, "application/octet-stream", BAD,
               **{"Inference-Header-Content-Length": length})


def case_v2_valid(rng: random.Random) -> Case:
    """A good v2 request (JSON or binary, tensor or PNG answer): 200."""
    doc, data = v2_doc(rng)
    if rng.random() < 0.5:
        doc["parameters"] = {"format": rng.choice(("png", "tensor"))}
    if rng.random() < 0.5:
        return raw("valid v2 JSON", json.dumps(doc).encode(), "application/json", frozenset({200}))
    tensor = doc["inputs"][0]
    del tensor["data"]
    tensor["parameters"] = {"binary_data_size": len(data) + 4}
    head = json.dumps(doc).encode()
    return raw("valid v2 binary", head + struct.pack("<I", len(data)) + data, "application/octet-stream",
               frozenset({200}), **{"Inference-Header-Content-Length": str(len(head))})


# Weights: how often each family comes up.
FAMILIES: list[tuple[Callable[[random.Random], Case], int]] = [
    (case_truncated, 10), (case_bit_flips, 14), (case_byte_edits, 10), (case_huge, 8), (case_huge_in_multipart, 2),
    (case_truncated_within_limits, 1), (case_random, 8), (case_wrong_content_type, 5),
    (case_image_declared_json, 2), (case_empty, 3), (case_malformed_json, 8), (case_bad_option, 6),
    (case_json_option_types, 3), (case_malformed_multipart, 8), (case_form_urlencoded, 2),
    (case_broken_form_encoding, 3), (case_odd_accept, 3), (case_valid, 4),
    (case_expensive, 4), (case_v2_bad_field, 5), (case_v2_header_length, 2), (case_v2_valid, 2),
]


def fuzz_case(seed: int, index: int) -> Case:
    """Case `index` of run `seed`: the same bytes every time."""
    rng = random.Random(f"{seed}:{index}")
    families, weights = zip(*FAMILIES, strict=True)
    make = rng.choices(families, weights)[0]
    case = make(rng)
    case.name = f"seed {seed} case {index}: {case.name}"
    return case


# The soak's bad requests: families whose answer is always a 4xx (never a lucky 200).
SOAK_BAD: list[Callable[[random.Random], Case]] = [
    case_huge, case_wrong_content_type, case_image_declared_json, case_empty, case_malformed_json,
    case_bad_option, case_truncated_within_limits, case_expensive_refused, case_v2_bad_field,
    case_v2_header_length,
]


def soak_bad_case(rng: random.Random) -> Case:
    if rng.random() < 0.15:
        fmt, data = scene(rng)
        cut = rng.randint(len(data) // 5, len(data) // 2)  # half an image never decodes
        return raw(f"{fmt} cut at {cut}/{len(data)}", data[:cut], MEDIA[fmt], BAD)
    if rng.random() < 0.02:
        # Over the handler's max_bytes (20 MB) but under TorchServe's max_request_size: the handler's 413.
        return raw("20.5 MB body", np.zeros(20_500_000, np.uint8).tobytes(), "application/octet-stream",
                   TOO_LARGE)
    return rng.choice(SOAK_BAD)(rng)
