"""Decoding request bodies: formats, orientation, modes, limits and the errors for bad input."""

import base64

import numpy as np
import pytest
from PIL import Image
from support import encode_image, random_image

from segserve.config import Limits
from segserve.decode import ImageFile, decode_image, extract_image_bytes, to_rgb
from segserve.errors import BadRequest, EmptyBody, ImageTooLarge, InvalidImage, PayloadTooLarge, UnsupportedMediaType

LIMITS = Limits(max_bytes=5_000_000, max_pixels=4_000_000)


@pytest.mark.parametrize("fmt, params", [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}),
                                         ("BMP", {}), ("TIFF", {}), ("GIF", {})])
def test_common_formats_decode_to_rgb_at_their_size(fmt, params):
    image = random_image(37, 23)
    decoded = decode_image(encode_image(image, fmt, **params), LIMITS)
    assert decoded.mode == "RGB"
    assert decoded.size == (37, 23)


def test_lossless_roundtrip_keeps_pixels():
    image = random_image(16, 9, seed=3)
    decoded = decode_image(encode_image(image, "PNG"), LIMITS)
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_exif_orientation_is_applied():
    image = random_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode_image(image, "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, LIMITS)
    assert decoded.size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1"])
def test_any_mode_becomes_rgb(mode):
    image = random_image(12, 8).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode_image(encode_image(image, fmt), LIMITS).mode == "RGB"


def test_sixteen_bit_gray_is_scaled_not_clipped():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    image = Image.fromarray(ramp)  # mode I;16
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (8, 8, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert len(np.unique(rgb[..., 0])) > 50


def test_empty_body_is_400():
    with pytest.raises(EmptyBody) as info:
        decode_image(b"", LIMITS)
    assert info.value.status == 400


def test_not_an_image_is_400():
    with pytest.raises(InvalidImage) as info:
        decode_image(b"hello, this is not an image", LIMITS)
    assert info.value.status == 400
    assert "not an image" in info.value.message


def test_truncated_image_is_400():
    data = encode_image(random_image(64, 64), "PNG")
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2], LIMITS)


def test_too_many_bytes_is_413_with_limit_named():
    data = encode_image(random_image(64, 64), "PNG")
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(data, Limits(max_bytes=100, max_pixels=10_000))
    assert info.value.status == 413 and "max_bytes" in info.value.message


def test_too_many_pixels_is_413_before_full_decode():
    # A 1-bit PNG of 20000x20000 is small on the wire but 400 Mpx once decoded.
    data = encode_image(Image.new("1", (20000, 20000)), "PNG")
    assert len(data) < 1_000_000
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, LIMITS)
    assert info.value.status == 413 and "max_pixels" in info.value.message


def test_extract_raw_body_and_multipart_fields():
    assert extract_image_bytes({"body": bytearray(b"abc")}) == b"abc"
    assert extract_image_bytes({"data": b"abc"}) == b"abc"
    assert extract_image_bytes({"file": b"abc"}) == b"abc"


def test_extract_json_base64():
    payload = base64.b64encode(b"\x89PNG...").decode()
    assert extract_image_bytes({"body": {"image": payload}}) == b"\x89PNG..."
    assert extract_image_bytes({"body": {"image": "data:image/png;base64," + payload}}) == b"\x89PNG..."


def test_two_images_in_one_request_is_a_400_not_a_silent_choice():
    with pytest.raises(BadRequest, match="one image per request"):
        extract_image_bytes({"data": b"a", "file": b"b"})


def test_extract_errors():
    with pytest.raises(EmptyBody):
        extract_image_bytes({})
    with pytest.raises(InvalidImage):
        extract_image_bytes({"body": {"image": "***not base64***"}})
    with pytest.raises(UnsupportedMediaType) as info:
        extract_image_bytes({"body": "some text"})
    assert info.value.status == 415


def test_the_header_is_read_before_the_pixels_and_the_limits_refused_at_open():
    data = encode_image(Image.new("1", (20000, 20000)), "PNG")
    with pytest.raises(ImageTooLarge):
        ImageFile(data, LIMITS)
    truncated = encode_image(random_image(64, 48), "JPEG")
    file = ImageFile(truncated[: len(truncated) // 2], LIMITS)  # the header is whole: the pixels are not
    assert (file.header.format, file.header.mode, file.header.width, file.header.height) == ("JPEG", "RGB", 64, 48)
    with pytest.raises(InvalidImage, match="could not be decoded"):
        file.decode()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_the_header_size_is_upright_as_the_decoded_image_is(fmt):
    exif = Image.Exif()
    exif[0x0112] = 8  # shown turned a quarter
    file = ImageFile(encode_image(random_image(40, 20), fmt, exif=exif.tobytes()), LIMITS)
    assert (file.header.width, file.header.height, file.header.orientation) == (20, 40, 8)
    assert file.decode().size == (20, 40)


def test_a_json_body_may_carry_the_image_under_data_as_torchserve_handlers_do():
    import base64

    import pytest

    from segserve.decode import extract_image_bytes
    from segserve.errors import BadRequest

    png = b"\x89PNG\r\n\x1a\nrest"
    encoded = base64.b64encode(png).decode()
    assert extract_image_bytes({"body": {"data": encoded}}, {}) == png
    assert extract_image_bytes({"body": {"image": encoded, "format": "png"}}, {}) == png
    with pytest.raises(BadRequest, match="not both"):
        extract_image_bytes({"body": {"image": encoded, "data": encoded}}, {})
