"""Typed request errors, each mapped to an HTTP status and a JSON body.

Messages are written for the caller: they say what was wrong and how to fix
the call, and never carry stack traces or server paths.
"""

from __future__ import annotations


class RequestError(Exception):
    """A request failed; `status` and `type` say how, `message` says why."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str):
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


class UnsupportedMediaType(RequestError):
    status, type = 415, "unsupported_media_type"


class UnprocessableEntity(RequestError):
    """A well-formed request the model cannot take (e.g. a v2 tensor of the wrong datatype or shape)."""

    status, type = 422, "unprocessable_tensor"


class InternalError(RequestError):
    status, type = 500, "internal_error"

