"""handler.limits against requests that are cheap to send and expensive to serve (docs/resilience.md): each is
refused with its own 4xx naming the limit, where it can be known before the work (no decoder, no tracing, no
encoding ran), and never changes the answers of the requests batched with it. In-process, on stand-in models;
tests/test_hostile_server.py sends the same requests to a real TorchServe."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import IcoImagePlugin, Image
from support import REPO, encode_image, random_image
from support.handlers import ask, stand_in_handler

from segserve import encoders, formats, plan, v2
from segserve.config import INPUT_FORMATS, ConfigError, Limits, ServingConfig
from segserve.decode import ImageFile, jpeg_scans, tiff_strips
from segserve.errors import (
    BadRequest,
    ImageTooLarge,
    InvalidImage,
    InvalidOption,
    LimitExceeded,
    ResponseTooLarge,
    UnsupportedMediaType,
    shown,
)
from segserve.options import Options, parse_options
from segserve.tools.inprocess import Request, handle

sys.path.insert(0, str(REPO))
from bench import hostile  # noqa: E402

LIMITS = Limits()


@pytest.fixture(scope="module")
def argmax(tmp_path_factory):
    """The handler on the ChannelArgmax stand-in (class = the brightest channel) with the default limits."""
    return stand_in_handler(tmp_path_factory.mktemp("argmax"))


def no_opener(monkeypatch):
    """Make any Pillow opener a test failure: what is refused from its first bytes never reaches one."""
    def refuse(*args, **kwargs):
        raise AssertionError("Image.open ran")

    monkeypatch.setattr(Image, "open", refuse)


# -- the allow-list ---------------------------------------------------------------------------------------
def test_the_allowed_formats_are_a_strict_setting():
    section = {"model": {"name": "m", "arch": "unet", "weights": "w"}, "classes": ["a", "b"], "input": {"size": 8}}
    assert ServingConfig.from_dict(section).limits.formats == INPUT_FORMATS
    limited = ServingConfig.from_dict({**section, "limits": {"formats": ["jpeg", "PNG", "png"]}})
    assert limited.limits.formats == ("JPEG", "PNG")
    for bad, words in ((["ICO2"], "'ICO2' is not an image format"), ("JPEG", "must be a list"), ([], "a list"),
                       ([5], "a list")):
        with pytest.raises(ConfigError, match=words):
            ServingConfig.from_dict({**section, "limits": {"formats": bad}})
    with pytest.raises(ConfigError, match="handler.limits.max_windows"):
        ServingConfig.from_dict({**section, "limits": {"max_windows": 0}})


@pytest.mark.parametrize("fmt", ["ICO", "ICNS", "JPEG2000", "QOI", "DDS", "SGI", "PCX"])
def test_other_formats_are_415_from_their_first_bytes(monkeypatch, fmt):
    data = hostile.other_format(fmt)
    no_opener(monkeypatch)
    with pytest.raises(UnsupportedMediaType) as info:
        ImageFile(data, LIMITS)
    assert info.value.status == 415 and f"is {fmt}," in info.value.message
    assert "JPEG, PNG, WEBP, TIFF, BMP or GIF" in info.value.message


def test_an_ico_holding_a_huge_png_is_refused_before_its_png_is_read(monkeypatch):
    ico = hostile.ico_holding(hostile.zero_png(13000, 13000, "1"))
    monkeypatch.setattr(IcoImagePlugin.IcoFile, "frame", lambda *a: pytest.fail("the ICO's image was read"))
    with pytest.raises(UnsupportedMediaType):
        ImageFile(ico, LIMITS)


def test_an_allowed_ico_still_meets_pillows_bomb_limit_set_from_max_pixels():
    # Where ICO is allowed, Pillow reads its embedded PNG inside Image.open: its own bomb check stops it there.
    limits = Limits(formats=("PNG", "ICO"), max_pixels=1_000_000)
    with pytest.raises(ImageTooLarge, match="max_pixels"):
        ImageFile(hostile.ico_holding(hostile.zero_png(3000, 3000, "1")), limits)
    assert Image.MAX_IMAGE_PIXELS * 2 >= limits.max_pixels >= Image.MAX_IMAGE_PIXELS
    assert ImageFile(hostile.other_format("ICO"), limits).header.format == "ICO"


def test_bytes_of_no_image_format_are_400_naming_the_formats():
    for data in (b"hello", b"\x00", b"\x89PNG", b"II*"):
        with pytest.raises(InvalidImage, match="JPEG, PNG, WEBP, TIFF, BMP or GIF"):
            ImageFile(data, LIMITS)
    only_png = Limits(formats=("PNG",))
    with pytest.raises(UnsupportedMediaType, match="is JPEG.*send PNG"):
        ImageFile(encode_image(random_image(8, 8), "JPEG"), only_png)


# -- decoder work -----------------------------------------------------------------------------------------
def test_jpeg_scans_are_counted_and_refused_before_decoding(monkeypatch):
    image = random_image(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 1
    baseline = encode_image(image, "JPEG", exif=exif.tobytes())
    progressive = encode_image(image, "JPEG", progressive=True)
    assert jpeg_scans(baseline, 50) == 1
    assert 2 <= jpeg_scans(progressive, 50) <= 12
    bomb = hostile.many_scans_jpeg(500, (256, 256))
    assert jpeg_scans(bomb, 50) == 500
    assert ImageFile(hostile.many_scans_jpeg(50, (256, 256)), LIMITS).decode().size == (256, 256)
    no_opener(monkeypatch)
    with pytest.raises(LimitExceeded, match="500 scans.*max_jpeg_scans") as info:
        ImageFile(bomb, LIMITS)
    assert info.value.status == 413


def test_tiff_strips_are_counted_and_refused_before_pillow_opens_it(monkeypatch):
    limits = Limits(max_tiff_strips=100)
    assert tiff_strips(hostile.many_strips_tiff(100)) == 100
    decoded = ImageFile(hostile.many_strips_tiff(100), limits).decode()
    assert decoded.size == (1, 100) and decoded.getpixel((0, 99)) == (128, 128, 128)
    striped = encode_image(random_image(64, 64), "TIFF", compression="tiff_lzw", strip_size=64 * 3 * 4)
    assert tiff_strips(striped) == 16 and ImageFile(striped, LIMITS).decode().size == (64, 64)
    no_opener(monkeypatch)
    with pytest.raises(LimitExceeded, match="101 strips.*max_tiff_strips"):
        ImageFile(hostile.many_strips_tiff(101), limits)
    with pytest.raises(LimitExceeded, match="max_tiff_strips"):
        ImageFile(hostile.many_strips_tiff(400_000), LIMITS)


def test_only_the_first_frame_of_an_animation_is_decoded(monkeypatch):
    frames = [random_image(32, 24, seed=s).convert("P") for s in range(300)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    from PIL import GifImagePlugin

    seeks = []
    original = GifImagePlugin.GifImageFile.seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "seek", lambda self, frame: seeks.append(frame) or
                        original(self, frame))
    decoded = ImageFile(buffer.getvalue(), LIMITS).decode()
    assert np.array_equal(np.asarray(decoded), np.asarray(frames[0].convert("RGB")))
    assert set(seeks) <= {0}


def test_a_png_whose_orientation_only_decoding_tells_is_checked_both_ways():
    png = encode_image(random_image(300, 10), "PNG")
    file = ImageFile(png[:len(png) // 2], LIMITS)  # header whole, pixels cut: `sizes` must not decode
    assert file.sizes == ((300, 10), (10, 300))
    with pytest.raises(InvalidImage):
        file.header  # noqa: B018 - decoding the PNG is what reading its orientation takes
    jpeg = ImageFile(encode_image(random_image(300, 10), "JPEG"), LIMITS)
    assert jpeg.sizes == ((300, 10),)


# -- windows and memory, before any pixel is decoded --------------------------------------------------------
def test_a_thin_image_is_refused_for_its_windows_with_a_hint(tmp_path):
    handler = stand_in_handler(tmp_path, limits={"max_windows": 20}, tiling={"auto_above_pixels": 1000})
    thin = hostile.zero_png(1, 6000)
    cut = thin[:-40]  # no pixels to decode: a 413 shows the refusal came first
    reply = ask(handler, {"body": cut, "tile": b"on"})
    error = json.loads(reply.body)
    assert (reply.status, error["type"]) == (413, "limit_exceeded")
    assert "31 windows" in error["message"] and "max_windows" in error["message"] and "tile=off" in error["message"]
    assert ask(handler, {"body": cut}).status == 413  # tile=auto
    resized = ask(handler, {"body": thin, "tile": b"off", "format": b"png"})
    assert resized.status == 200 and Image.open(io.BytesIO(resized.body)).size == (1, 6000)


def test_the_memory_estimate_refuses_before_decoding(tmp_path):
    handler = stand_in_handler(tmp_path, limits={"max_request_memory": 50_000_000})
    big = hostile.zero_png(4000, 3000)
    reply = ask(handler, {"body": big[:-40]})
    error = json.loads(reply.body)
    assert (reply.status, error["type"]) == (413, "limit_exceeded") and "max_request_memory" in error["message"]
    assert ask(handler, {"body": encode_image(random_image(640, 480))}).status == 200


def test_the_memory_estimate_follows_the_path_and_format(config):
    def need(width, height, tiled=False, fmt="json", classes=3, decode_bytes=4):
        return plan.request_memory(config, width, height, tiled=tiled, entry=formats.get(fmt), classes=classes,
                                   decode_bytes=decode_bytes)

    assert need(2000, 2000) > need(1000, 1000) * 3.9
    assert need(2000, 2000, fmt="overlay") > need(2000, 2000, fmt="png")
    assert need(2000, 2000, fmt="probs") > need(2000, 2000, fmt="png")
    # Tiled, the blended band grows with the width: a wide image costs more than a square one of its area.
    assert need(200_000, 200, tiled=True) > 10 * need(6325, 6324, tiled=True) / 2
    assert need(2000, 2000, decode_bytes=60) == 2000 * 2000 * 60  # decoding the largest stage


def test_fields_are_counted_and_sized_before_they_are_parsed(config):
    with pytest.raises(BadRequest, match="400000 fields.*max_fields"):
        plan.check_fields({f"f{i}": b"" for i in range(400_000)}, config.limits)
    with pytest.raises(BadRequest, match="max_fields"):
        plan.check_fields({"body": {"image": "x", **{f"f{i}": 1 for i in range(17)}}}, config.limits)
    with pytest.raises(BadRequest, match="'format' is 20000000 long.*max_option_bytes") as info:
        plan.check_fields({"data": b"x", "format": b"x" * 20_000_000}, config.limits)
    assert len(info.value.message) < 300
    plan.check_fields({"data": b"x", "format": b"png", "classes": b"cell,nucleus"}, config.limits)


# -- answers: sizes, tracing, memory ----------------------------------------------------------------------
def checker(size: int) -> np.ndarray:
    return (np.indices((size, size)).sum(0) % 2).astype(np.uint8)


def test_polygon_rings_are_counted_before_tracing(config, monkeypatch):
    import cv2

    mask = checker(500)  # 125,000 single-pixel squares of class 1 touching at their corners
    assert encoders.ring_count(mask == 1) >= 125_000
    monkeypatch.setattr(cv2, "findContours", lambda *a: pytest.fail("traced"))
    with pytest.raises(LimitExceeded, match="max_polygon_rings"):
        encoders.polygons_response(mask, config)


def test_polygon_vertices_are_counted_before_they_become_lists(config):
    mask = np.zeros((200, 200), np.uint8)
    mask[10:190:4, 10:190] = 1  # 45 lines: few rings, 4 vertices each
    limited = dataclasses.replace(config, limits=dataclasses.replace(config.limits, max_polygon_vertices=100))
    with pytest.raises(LimitExceeded, match="vertices.*max_polygon_vertices"):
        encoders.polygons_response(mask, limited)
    assert json.loads(encoders.polygons_response(mask, config))["features"][1]["properties"]["area"] == 45 * 180


@pytest.mark.parametrize("name", list(formats.REGISTRY))
def test_every_format_is_held_to_the_response_limit_once_encoded(config, name):
    rng = np.random.default_rng(0)
    entry = formats.REGISTRY[name]
    output = rng.random((3, 60, 80)).astype(np.float16) if entry.needs_probs else rng.integers(0, 3, (60, 80)).astype(
        np.uint8)
    image = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) if entry.needs_image else None
    source = medical_source(entry.needs_source, config, (60, 80)) if entry.needs_source else None
    job = formats.EncoderInput(output, Options(format=name), config, image, source)
    assert formats.encode(entry, job)
    small = dataclasses.replace(config, limits=dataclasses.replace(config.limits, max_response_bytes=500))
    with pytest.raises(ResponseTooLarge, match="max_response_bytes") as info:
        formats.encode(entry, dataclasses.replace(job, config=small))
    assert info.value.status == 413 and entry.too_large_hint in info.value.message


def medical_source(kind: str, config, size: tuple[int, int]):
    """The DICOM or NIfTI source a medical format references: a sample of the synthetic scene (segserve.medical)."""
    pytest.importorskip("pydicom", reason="the medical formats need segserve's 'medical' extra")
    from segserve.medical import open_source
    from segserve.tools.medical_samples import scene_dicom, scene_nifti

    data = scene_dicom((0,), size)[0] if kind == "dicom" else scene_nifti((0,), size)[0]
    return open_source(kind, data, config, Options())


def test_overlay_works_in_a_few_bytes_per_pixel(config):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (2000, 2400, 3), dtype=np.uint8))
    mask = rng.integers(0, 3, (2000, 2400)).astype(np.uint8)
    tracemalloc.start()
    out = encoders.overlay(image, mask, config, legend=False)
    peak = tracemalloc.get_traced_memory()[1]  # numpy's arrays (Pillow's own buffers are not traced)
    tracemalloc.stop()
    # The image's bytes and the copy blended in place (3 bytes a pixel each), and one band: not ~50 a pixel.
    assert peak < 8 * mask.size, peak / mask.size
    # The same drawing on the whole image at once: grey, class colours blended, outlines in the class colour.
    grey = np.asarray(image.convert("L"), np.float32)[..., None].repeat(3, axis=2)
    colors = np.array([c.color for c in config.classes], np.float32)
    expected = np.where((mask > 0)[..., None], grey * 0.55 + colors[mask] * 0.45, grey)
    edge = np.zeros(mask.shape, bool)
    across, down = mask[:, :-1] != mask[:, 1:], mask[:-1] != mask[1:]
    edge[:, :-1] |= across
    edge[:, 1:] |= across
    edge[:-1] |= down
    edge[1:] |= down
    edge &= mask > 0
    expected[edge] = colors[mask[edge]]
    assert np.array_equal(np.asarray(out), expected.round().astype(np.uint8))


def test_the_v2_tensor_answer_is_written_without_a_python_list_and_capped(config):
    mask = np.random.default_rng(2).integers(0, 256, (70, 90)).astype(np.uint8)
    request = v2.V2Request()
    body, _, _ = v2.answer(mask, request, config)
    assert json.loads(body)["outputs"][0]["data"] == mask.ravel().tolist()
    assert len(v2.json_values(mask)) == v2.json_values_size(mask)
    small = dataclasses.replace(config, limits=dataclasses.replace(config.limits, max_response_bytes=10_000))
    with pytest.raises(ResponseTooLarge, match='"format": "png"'):
        v2.answer(mask, request, small)
    with pytest.raises(ResponseTooLarge, match="at least 60000000 bytes"):
        v2.check_size(6000, 5000, request, config)  # two bytes a pixel at least, before any work
    v2.check_size(6000, 5000, v2.V2Request(binary_output=True), config)


# -- one request never fails another ----------------------------------------------------------------------
def test_option_values_are_parsed_as_ascii_and_echoed_short(config):
    def refused(**fields):
        with pytest.raises(InvalidOption) as info:
            parse_options({"data": b"x", **{k: v.encode() for k, v in fields.items()}}, {}, config)
        return info.value.message

    for value in ("²", "9" * 5000, "١", "1²"):
        assert "is not a class" in refused(classes=value)
    for value in ("²", "9" * 5000, "٣"):
        assert "min_area" in refused(min_area=value)
    message = refused(format="x" * 100_000)
    assert len(message) < 400 and "(100000 long)" in message
    assert parse_options({"body": {"image": "", "min_area": 12}}, {}, config).post.min_area == 12
    assert shown(10 ** 5000).startswith("a number of") and shown({"a": 1}) == "a JSON object"


V2_IMAGE = encode_image(random_image(40, 30), "PNG")


def v2_doc(**extra) -> dict:
    import base64

    return {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(V2_IMAGE).decode()]}],
            **extra}


def v2_binary(header_length: str) -> Request:
    head = json.dumps({"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(V2_IMAGE) + 4}}]}).encode()
    return Request({"body": head + len(V2_IMAGE).to_bytes(4, "little") + V2_IMAGE},
                   {"Inference-Header-Content-Length": header_length})


HOSTILE = {
    "header length ²": v2_binary("²"),
    "header length of 40 digits": v2_binary("9" * 40),
    "v2 parameters [1]": Request({"body": v2_doc(parameters=[1])}),
    "v2 outputs 5": Request({"body": v2_doc(outputs=5)}),
    "v2 outputs [5]": Request({"body": v2_doc(outputs=[5])}),
    "v2 output parameters [1]": Request({"body": v2_doc(outputs=[{"name": "mask", "parameters": [1]}])}),
    "v2 input parameters [1]": Request({"body": {"inputs": [{**v2_doc()["inputs"][0], "parameters": [1]}]}}),
    "v2 id 5": Request({"body": v2_doc(id=5)}),
    "v2 id of 10 KB": Request({"body": v2_doc(id="x" * 10_000)}),
    "v2 binary_data_output 'yes'": Request({"body": v2_doc(parameters={"binary_data_output": "yes"})}),
    "v2 format 5": Request({"body": v2_doc(parameters={"format": 5})}),
    "v2 shape [true]": Request({"body": {"inputs": [{**v2_doc()["inputs"][0], "shape": [True]}]}}),
    "v2 shape of 2**70": Request({"body": {"inputs": [{**v2_doc()["inputs"][0], "shape": [2 ** 70]}]}}),
    "v2 datatype 5": Request({"body": {"inputs": [{**v2_doc()["inputs"][0], "datatype": 5}]}}),
    "classes=²": Request({"body": V2_IMAGE, "classes": "²".encode()}),
    "5000-digit class": Request({"body": V2_IMAGE, "classes": b"9" * 5000}),
    "min_area=²": Request({"body": V2_IMAGE, "min_area": "²".encode()}),
    "20 MB format": Request({"body": V2_IMAGE, "format": b"x" * 20_000_000}),
    "17 fields": Request({"body": V2_IMAGE, **{f"f{i}": b"" for i in range(17)}}),
    "ICO": Request({"body": hostile.other_format("ICO")}),
    "2000-scan JPEG": Request({"body": hostile.many_scans_jpeg(2000, (256, 256))}),
    "400,000-strip TIFF": Request({"body": hostile.many_strips_tiff(400_000)}),
    "1 x 40,000,000 PNG": Request({"body": hostile.zero_png(1, 40_000_000)}),
    "polygons of a lattice": Request({"body": hostile.lattice_png(600, 600), "format": b"polygons",
                                      "tile": b"on"}),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_request_gets_its_own_4xx_and_its_batch_is_answered_as_alone(argmax, name):
    goods = [Request({"body": encode_image(random_image(50, 40, seed=1)), "format": b"png"}),
             Request({"body": v2_doc(id="good")})]
    alone = [handle(argmax, [good])[0] for good in goods]
    replies = handle(argmax, [goods[0], HOSTILE[name], goods[1]])
    assert [r.body for r in (replies[0], replies[2])] == [a.body for a in alone]
    assert [r.status for r in (replies[0], replies[2])] == [200, 200]
    hostile_reply = replies[1]
    assert 400 <= hostile_reply.status < 500 and hostile_reply.content_type == "application/json"
    error = json.loads(hostile_reply.body)
    assert error["code"] == hostile_reply.status and error["message"] and len(hostile_reply.body) < 2000
