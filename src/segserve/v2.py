"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) requests and answers, handled natively.

TorchServe's own `kservev2` service envelope reads only the first request of a
batch, so segserve reads v2 bodies itself and keeps TorchServe's batching: every
v2 request in a batch is one image and gets its own v2 answer.

A request has one input, either
- BYTES, shape [1] (or []): an encoded image file (PNG, JPEG, ...), as base64 text in
  JSON `data` (JSON strings cannot carry raw bytes; KServe and tritonclient users send
  base64) or raw in the binary-data extension; or
- UINT8, shape [H, W, 3] (or [1, H, W, 3]): RGB pixels, row-major.
The answer has one output, `mask`: UINT8 [H, W] class ids (default), or with the
parameter `format: "png"` BYTES [1] holding the indexed PNG mask. Outputs come as JSON
`data` unless the request asks for the binary-data extension (`binary_data_output`, or
`binary_data` on the `mask` entry of `outputs`; tritonclient asks when it names no
outputs). The binary-data extension (Triton's, also in KServe's clients) puts tensors
after the JSON header; the `Inference-Header-Content-Length` header gives its length.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from . import decode, encoders
from .config import Limits, ServingConfig
from .errors import (
    BadRequest,
    EmptyBody,
    ImageTooLarge,
    InvalidImage,
    InvalidOption,
    RequestError,
    ResponseTooLarge,
    UnprocessableEntity,
    shown,
)
from .masks import keep_classes
from .options import parse_classes, request_header

HEADER_LENGTH = "inference-header-content-length"
OUTPUT_NAME = "mask"
OUTPUT_KINDS = ("tensor", "png")  # the `format` parameter: UINT8 [H, W] class ids, or BYTES [1] PNG
REQUEST_PARAMETERS = ("format", "classes", "binary_data_output")
# Longest request id echoed in answers and errors.
MAX_ID_CHARS = 256
# Bytes per mask pixel an answer works with beside the mask: the JSON text of the tensor, built in chunks.
WORKING_BYTES = 6


@dataclass(frozen=True)
class V2Request:
    """How to answer one parsed v2 request."""

    id: str | None = None
    output: str = "tensor"  # one of OUTPUT_KINDS
    classes: tuple[int, ...] | None = None  # None: all classes
    binary_output: bool = False


def _body(inputs: dict[str, Any]) -> Any:
    return inputs.get("body", inputs.get("data"))


def is_v2(inputs: dict[str, Any], headers: dict[str, Any]) -> bool:
    """A v2 body: JSON with an `inputs` list, or a binary-extension body (its header length is set)."""
    body = _body(inputs)
    if isinstance(body, dict):
        return isinstance(body.get("inputs"), list)
    if isinstance(body, (bytes, bytearray)):
        if request_header(headers, HEADER_LENGTH) is not None:
            return True
        # JSON sent without a JSON Content-Type reaches us as bytes; images never start with '{'.
        if body[:1] == b"{":
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
                return False
            return isinstance(doc, dict) and isinstance(doc.get("inputs"), list)
    return False


def split_body(inputs: dict[str, Any], headers: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The v2 JSON document and the binary tail after it (empty without the binary-data extension)."""
    body = _body(inputs)
    if isinstance(body, dict):
        return body, b""
    body = bytes(body)
    declared = request_header(headers, HEADER_LENGTH)
    text = str(len(body)) if declared is None else declared.strip()
    # ASCII digits only: str.isdigit() takes "²", which int() refuses.
    length = int(text) if text.isascii() and text.isdigit() and len(text) <= 12 else None
    if length is None or length > len(body):
        raise BadRequest(f"Inference-Header-Content-Length {shown(declared)} does not fit a body of {len(body)} bytes")
    try:
        doc = json.loads(body[:length])
    except (ValueError, RecursionError):
        raise BadRequest("the v2 inference header is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise BadRequest('a v2 request needs a JSON object with an "inputs" list')
    return doc, body[length:]


def parse(inputs: dict[str, Any], headers: dict[str, Any],
          config: ServingConfig) -> tuple[V2Request, decode.ImageFile | Image.Image]:
    """A v2 request -> how to answer it, and its image: an image file opened lazily (BYTES; its header read,
    the limits checked) or RGB pixels (UINT8). RequestError (400/413/422) if it is unusable."""
    doc, binary = split_body(inputs, headers)
    if len(doc["inputs"]) != 1:
        raise UnprocessableEntity(f"one input per request (an image), got {len(doc['inputs'])}; send each image "
                                  "as its own request: the server batches concurrent requests")
    tensor = doc["inputs"][0]
    if not isinstance(tensor, dict):
        raise BadRequest("each v2 input is an object with name, shape, datatype and data")
    raw = _binary_data(tensor, binary)
    declared = tensor.get("datatype")
    datatype = declared.upper() if isinstance(declared, str) else None
    shape = _shape(tensor)
    if datatype == "BYTES":
        image = decode.ImageFile(_image_file(tensor, shape, raw), config.limits)
    elif datatype == "UINT8":
        image = _pixels(tensor, shape, raw, config.limits)
    else:
        raise UnprocessableEntity(f"input datatype {shown(declared)} is not supported: send BYTES (an image "
                                  "file) or UINT8 (RGB pixels, shape [H, W, 3])")
    parameters = _parameters(doc.get("parameters"), "the v2 request's parameters")
    unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS))
    if unknown:
        raise InvalidOption(f"unknown parameter {shown(unknown[0])}; the parameters are: "
                            f"{', '.join(REQUEST_PARAMETERS)}")
    kind = parameters.get("format")
    binary_output = _flag(parameters.get("binary_data_output", False), "binary_data_output")
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise BadRequest(f'v2 "outputs" must be a list of {{"name": "{OUTPUT_NAME}"}} objects, got {shown(outputs)}')
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if name != OUTPUT_NAME:
            raise InvalidOption(f"unknown output {shown(name)}; this model's output is {OUTPUT_NAME!r}")
        output_parameters = _parameters(output.get("parameters"), "a v2 output's parameters")
        kind = output_parameters.get("format", kind)
        binary_output = _flag(output_parameters.get("binary_data", binary_output), "binary_data")
    if kind is not None and not isinstance(kind, str):
        raise InvalidOption(f"format must be text, one of: {', '.join(OUTPUT_KINDS)}; got {shown(kind)}")
    kind = (kind or "tensor").lower()
    if kind not in OUTPUT_KINDS:
        raise InvalidOption(f"format={shown(kind)} is not supported for v2; use one of: {', '.join(OUTPUT_KINDS)}")
    request = V2Request(id=_id(doc.get("id")), output=kind,
                        classes=parse_classes(parameters.get("classes"), config), binary_output=binary_output)
    return request, image


def request_id(inputs: dict[str, Any], headers: dict[str, Any]) -> str | None:
    """The request's `id` when the body can be read that far and it is a usable id (for error answers)."""
    try:
        return _id(split_body(inputs, headers)[0].get("id"))
    except Exception:  # noqa: BLE001 - an unreadable id is only left out of the error answer
        return None


def _id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
        raise BadRequest(f'a v2 "id" is text of at most {MAX_ID_CHARS} characters, got {shown(value)}')
    return value


def _parameters(value: Any, what: str = "v2 parameters") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {shown(value)}")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidOption(f"{name} must be true or false, got {shown(value)}")
    return value


def _shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2 ** 32 for n in shape):
        raise BadRequest("a v2 input needs a shape: a short list of whole numbers, e.g. [1] or [H, W, 3]")
    return shape


def _binary_data(tensor: dict[str, Any], binary: bytes) -> bytes | None:
    size = _parameters(tensor.get("parameters"), "a v2 input's parameters").get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size > len(binary):
        raise BadRequest(f"binary_data_size {shown(size)} does not fit the {len(binary)} bytes after the v2 header")
    return binary[:size]


def _image_file(tensor: dict[str, Any], shape: list[int], raw: bytes | None) -> bytes:
    if math.prod(shape) != 1:
        raise UnprocessableEntity(f"a BYTES input holds one image file (shape [1]), got shape {shape}; send each "
                                  "image as its own request")
    if raw is not None:  # binary-data extension: 4-byte little-endian length, then the bytes
        if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != len(raw) - 4:
            raise BadRequest("a binary BYTES element is a 4-byte little-endian length followed by that many bytes")
        return raw[4:]
    data = tensor.get("data")
    while isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, str) or not data:
        raise EmptyBody("a BYTES input needs data: [\"<base64 of the image file>\"]")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("the BYTES input is not valid base64 (JSON carries image files as base64)") from None


def _pixels(tensor: dict[str, Any], shape: list[int], raw: bytes | None, limits: Limits) -> Image.Image:
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or shape[2] != 3:
        raise UnprocessableEntity(f"a UINT8 input is one RGB image of shape [H, W, 3], got {shape}; send each "
                                  "image as its own request")
    height, width = shape[0], shape[1]
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                            f"{limits.max_pixels} pixels (max_pixels)")
    if width == 0 or height == 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    if raw is not None:
        pixels = np.frombuffer(raw, dtype=np.uint8)
    else:
        try:
            pixels = np.asarray(tensor.get("data"), dtype=np.int64).ravel()
        except (ValueError, TypeError, OverflowError):
            raise BadRequest("UINT8 data must be whole numbers 0..255") from None
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
            raise BadRequest("UINT8 data must be whole numbers 0..255")
    if pixels.size != height * width * 3:
        raise BadRequest(f"shape {shape} needs {height * width * 3} values, got {pixels.size}")
    return Image.fromarray(pixels.astype(np.uint8).reshape(height, width, 3), "RGB")


# -- answers ------------------------------------------------------------------------------------
def check_size(width: int, height: int, request: V2Request, config: ServingConfig) -> None:
    """Refuse (413) before any work a tensor answer over max_response_bytes: one byte per pixel in binary, at least
    two ("0,") in JSON. A PNG answer's size is known once encoded (`answer` checks it)."""
    if request.output != "tensor":
        return
    least = width * height * (1 if request.binary_output else 2)
    limit = config.limits.max_response_bytes
    if least > limit:
        raise ResponseTooLarge(f"the mask of this {width}x{height} image is at least {least} bytes as a v2 "
                               f"{'binary' if request.binary_output else 'JSON'} tensor; the limit is {limit} "
                               '(max_response_bytes): use the parameter "format": "png"'
                               + ("" if request.binary_output else ", or binary_data_output"))


# The JSON text of every uint8 value followed by a comma, padded with zero bytes to 4 (dropped when written).
_DIGITS = np.zeros((256, 4), np.uint8)
for _value in range(256):
    _DIGITS[_value, :len(str(_value)) + 1] = np.frombuffer(f"{_value},".encode(), np.uint8)
_CHUNK = 1 << 20  # pixels per step of the JSON text: its temporaries stay a few MB


def json_values(mask: np.ndarray) -> bytes:
    """The mask's values as the items of a JSON list, "0,2,1", made with numpy a chunk at a time: a Python list
    of every pixel (mask.tolist()) is 8 bytes per pixel plus json.dumps' copies."""
    flat = mask.ravel()
    parts = []
    for start in range(0, flat.size, _CHUNK):
        tokens = _DIGITS[flat[start:start + _CHUNK]]
        parts.append(tokens[tokens != 0].tobytes())
    return b"".join(parts)[:-1]


def json_values_size(mask: np.ndarray) -> int:
    """len(json_values(mask)), counted without making it: each value's digits, and the commas between."""
    digits = mask.size + np.count_nonzero(mask >= 10) + np.count_nonzero(mask >= 100)
    return int(digits) + mask.size - 1


def answer(mask: np.ndarray, request: V2Request, config: ServingConfig) -> tuple[bytes, str, dict[str, str]]:
    """The v2 answer for one mask: (body, content type, extra response headers); 413 over max_response_bytes,
    known before the tensor's JSON text is made."""
    mask = keep_classes(mask, request.classes)
    limit = config.limits.max_response_bytes
    if request.output == "png":
        png = encoders.mask_to_png(mask, config.palette)
        output = {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [1]}
        raw, json_data = struct.pack("<I", len(png)) + png, [base64.b64encode(png).decode()]
        size = len(raw) if request.binary_output else 4 * len(png) // 3
    else:
        output = {"name": OUTPUT_NAME, "datatype": "UINT8", "shape": list(mask.shape)}
        raw, json_data = None, None
        size = mask.size if request.binary_output else json_values_size(mask)
    if size > limit:
        raise ResponseTooLarge(f"the v2 answer for this {mask.shape[1]}x{mask.shape[0]} image would be {size} bytes; "
                               f"the limit is {limit} (max_response_bytes): "
                               + ('use the parameter "format": "png"' if request.output == "tensor" else
                                  "send a smaller image"))
    doc: dict[str, Any] = {"model_name": config.name, "model_version": config.version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = [output]
    if request.binary_output:
        raw = raw if raw is not None else np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps(doc, separators=(",", ":")).encode()
        return head + raw, "application/octet-stream", {"Inference-Header-Content-Length": str(len(head))}
    if json_data is not None:
        output["data"] = json_data
        return json.dumps(doc, separators=(",", ":")).encode(), "application/json", {}
    # The doc's text with the tensor's values written into its last place: {..."outputs":[{...,"data":[...]}]}
    head = json.dumps(doc, separators=(",", ":")).encode()
    return head[:-3] + b',"data":[' + json_values(mask) + b"]}]}", "application/json", {}


def error_body(error: RequestError, request_id: str | None = None) -> bytes:
    """A v2 error (`{"error": message}`, what v2 clients read) plus segserve's code, type and message."""
    doc: dict[str, Any] = {"error": error.message, **error.to_dict()}
    if request_id is not None:
        doc["id"] = request_id
    return json.dumps(doc).encode()
