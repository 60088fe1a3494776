"""Typed request errors, each mapped to an HTTP status and a JSON body.

Messages are written for the caller: they say what was wrong and how to fix
the call, and never carry stack traces or server paths.
"""

from __future__ import annotations

from typing import Any

# What of a client's value an error message repeats, and the longest message: a 20 MB option value must not
# come back as a 20 MB error body and a 20 MB log line.
SHOWN_CHARS = 200
MESSAGE_CHARS = 1000


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`value` as an error message quotes it (its repr), cut to `limit` characters, with the length it had."""
    if isinstance(value, (str, bytes, bytearray)):
        total = len(value)
        text = repr(value[:limit + 1] if isinstance(value, str) else bytes(value[:limit + 1]))
        return text if total <= limit and len(text) <= limit else f"{text[:limit]}... ({total} long)"
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):  # repr of a 5000-digit number raises (Python's int-to-text limit)
        return repr(value) if value.bit_length() <= 256 else f"a number of {value.bit_length()} bits"
    kind = {list: "array", dict: "object"}.get(type(value), type(value).__name__)
    return f"a JSON {kind}"  # named, never printed


def truncated(text: str, limit: int = MESSAGE_CHARS, keep_end: bool = False) -> str:
    """`text` cut to about `limit` characters: its start, or with `keep_end` its start and its end (a traceback's
    last line says what went wrong)."""
    if len(text) <= limit:
        return text
    if keep_end:
        return f"{text[:limit // 2]}\n... ({len(text) - limit} characters cut) ...\n{text[-(limit // 2):]}"
    return f"{text[:limit]}... (cut at {limit} characters)"


class RequestError(Exception):
    """A request failed; `status` and `type` say how, `message` says why (at most MESSAGE_CHARS characters)."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str):
        message = truncated(message)
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.status, "type": self.type, "message": self.message}


class BadRequest(RequestError):
    status, type = 400, "bad_request"


class EmptyBody(BadRequest):
    type = "empty_body"


class InvalidImage(BadRequest):
    type = "invalid_image"


class InvalidOption(BadRequest):
    type = "invalid_option"


class PayloadTooLarge(RequestError):
    status, type = 413, "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    type = "image_too_large"


class ResponseTooLarge(PayloadTooLarge):
    """The answer would be (or came out) over handler.limits.max_response_bytes."""

    type = "response_too_large"


class LimitExceeded(PayloadTooLarge):
    """The request would cost more than a handler.limits setting allows (decoder work, windows, memory, rings);
    the message names the setting."""

    type = "limit_exceeded"


class NotAcceptable(RequestError):
    """The Accept header names only media types no format answers in."""

    status, type = 406, "not_acceptable"


class UnsupportedMediaType(RequestError):
    status, type = 415, "unsupported_media_type"


class UnprocessableEntity(RequestError):
    """A well-formed request the model cannot take (e.g. a v2 tensor of the wrong datatype or shape)."""

    status, type = 422, "unprocessable_tensor"


class InternalError(RequestError):
    status, type = 500, "internal_error"



class UnprocessableImage(UnprocessableEntity):
    """A well-formed medical file the model cannot take: a DICOM without pixel data, a NIfTI with an implausible
    header (segserve.medical)."""

    type = "unprocessable_image"
