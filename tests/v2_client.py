"""Open Inference Protocol v2 bodies built and answers read by tritonclient, as a v2 client would."""

from __future__ import annotations

import numpy as np
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput, InferResult

HEADER_LENGTH = "Inference-Header-Content-Length"


def image_input(data: bytes | str | np.ndarray, binary: bool, name: str = "image") -> InferInput:
    """An encoded image file as BYTES [1] (base64 text for JSON, raw bytes for binary), or pixels as UINT8."""
    if isinstance(data, np.ndarray):
        tensor = InferInput(name, list(data.shape), "UINT8")
        return tensor.set_data_from_numpy(data, binary_data=binary)
    tensor = InferInput(name, [1], "BYTES")
    return tensor.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=binary)


def request_body(tensor: InferInput, outputs: list[InferRequestedOutput] | None = None, request_id: str = "",
                 parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers tritonclient's InferenceServerClient.infer would send."""
    body, json_size = InferenceServerClient.generate_request_body([tensor], outputs=outputs, request_id=request_id,
                                                                  parameters=parameters)
    if json_size is None:
        return body, {"Content-Type": "application/json"}
    return body, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(json_size)}


def mask_output(binary: bool) -> InferRequestedOutput:
    return InferRequestedOutput("mask", binary_data=binary)


def parse(body: bytes, headers) -> InferResult:
    length = headers.get(HEADER_LENGTH) or headers.get(HEADER_LENGTH.lower())
    return InferenceServerClient.parse_response_body(body, header_length=int(length) if length else None)
