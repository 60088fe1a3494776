"""KServe's v1 protocol (TensorFlow Serving's REST form): `{"instances": [{"b64": "<image>"}, ...]}` answered
`{"predictions": [<answer>, ...]}`, one answer per instance in order.

KServe's TorchServe runtime sends `/v1/models/<name>:predict` to TorchServe, which hands the JSON body to the
handler as it would a `/predictions/<name>` one. Each instance is segmented as if sent alone (the body's other
fields are the options for all of them, e.g. `"format": "rle"`), through the same batch; the answers are put
back together here. An instance is `{"b64": ...}`, TorchServe's `{"data": ...}`, or TensorFlow's
`{"image_bytes": {"b64": ...}}`. A JSON answer (json, rle, polygons, coco, instances) is the prediction
itself; a binary one (png, overlay, probs) is `{"b64": ..., "content_type": ...}`.

A request with a bad instance fails whole (nothing a client sent is silently dropped): the status and type of
the first instance that failed, its message prefixed with `instances[<index>]: `.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from .config import Limits
from .errors import BadRequest, LimitExceeded, ResponseTooLarge

INSTANCE_KEYS = ("b64", "data")  # {"b64": ...} (KServe, TF Serving), {"data": ...} (TorchServe's examples)


def _document(inputs: dict[str, Any]) -> dict | None:
    body = inputs.get("body", inputs.get("data"))
    if isinstance(body, (bytes, bytearray)) and body[:1] == b"{":  # JSON sent without a JSON Content-Type
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            return None
    return body if isinstance(body, dict) else None


def v1_body(inputs: dict[str, Any]) -> dict | None:
    """The request's JSON object if it is a v1 body (one with `instances`), else None."""
    doc = _document(inputs)
    return doc if doc is not None and "instances" in doc else None


def _image(instance: Any, index: int) -> str:
    """The base64 image of one instance; BadRequest naming the instance and the forms accepted otherwise."""
    forms = '{"b64": "<base64 image>"}, {"data": "<base64 image>"} or {"image_bytes": {"b64": "<base64 image>"}}'
    if isinstance(instance, dict) and set(instance) == {"image_bytes"} and isinstance(instance["image_bytes"], dict):
        instance = instance["image_bytes"]
        if set(instance) != {"b64"}:
            raise BadRequest(f"instances[{index}]: image_bytes takes only b64; send {forms}")
    if not isinstance(instance, dict) or len(instance) != 1 or next(iter(instance)) not in INSTANCE_KEYS:
        raise BadRequest(f"instances[{index}] is not an image: send each instance as {forms}; options go beside "
                         '"instances", for all of them (e.g. "format": "png")')
    value = next(iter(instance.values()))
    if not isinstance(value, str) or not value:
        raise BadRequest(f"instances[{index}]: the image must be a non-empty base64 string, as {forms}")
    return value


def expand(doc: dict[str, Any], limits: Limits) -> list[dict[str, Any]]:
    """One request per instance of a v1 body (v1_body's), as segserve's JSON body `{"image": <base64>, <the
    body's options>}`."""
    instances = doc.get("instances")
    if not isinstance(instances, list) or not instances:
        raise BadRequest('"instances" must be a non-empty list of images, e.g. {"instances": [{"b64": "..."}]}')
    if len(instances) > limits.max_v1_instances:
        raise LimitExceeded(f"the request has {len(instances)} instances; the limit is {limits.max_v1_instances} "
                            "(max_v1_instances): send them in several requests")
    options = {k: v for k, v in doc.items() if k != "instances"}
    if {"image", "data", "inputs"} & set(options):
        raise BadRequest('a v1 request carries its images in "instances" only: drop the body\'s "image", "data" '
                         'or "inputs" (v2\'s inputs go in a request of their own)')
    return [{"body": {"image": _image(instance, index), **options}} for index, instance in enumerate(instances)]


def prediction(content_type: str, body: bytes) -> Any:
    """One instance's answer inside `predictions`."""
    if content_type.split(";")[0].strip() == "application/json":
        return json.loads(body)
    return {"b64": base64.b64encode(body).decode("ascii"), "content_type": content_type}


def combine(answers: list[tuple[int, str, bytes]], limits: Limits) -> tuple[int, bytes, str | None]:
    """(status, body, error type or None) of the v1 answer from each instance's (status, content type, body), in
    order."""
    for index, (status, _, body) in enumerate(answers):
        if status >= 400:
            error = json.loads(body)  # segserve's own error body: {"code", "type", "message"}
            message = f"instances[{index}]: {error.get('message', '')}"
            return status, json.dumps({**error, "message": message}).encode(), error.get("type")
    combined = json.dumps({"predictions": [prediction(ct, body) for _, ct, body in answers]},
                          separators=(",", ":")).encode()
    if len(combined) > limits.max_response_bytes:
        error = ResponseTooLarge(f"the answers of these {len(answers)} instances came to {len(combined)} bytes; the "
                                 f"limit is {limits.max_response_bytes} (max_response_bytes): send fewer instances "
                                 "per request, or ask for format=png")
        return error.status, json.dumps(error.to_dict()).encode(), error.type
    return 200, combined, None
