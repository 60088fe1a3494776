"""The client's one error hierarchy: everything segserve.client raises is a SegservError.

    SegservError                      status, type, message (status 0: no HTTP answer)
    ├── ServerRefused                 the server answered with an error status (4xx, 5xx)
    ├── Unreachable                   no answer: connection refused, timeout (after the retries)
    ├── InputError (ValueError)       an image the client cannot send: unreadable file, bad array shape
    │   └── InputTypeError (TypeError)  not a path, bytes, numpy array or PIL image
    ├── FormatError (ValueError)      asked an answer for what its format does not hold (names the format to ask for)
    └── KeyFileError (ValueError)     a named key file that is missing or is no TorchServe key file

The worker's errors (segserve.errors.RequestError) are the server side of the same story: their JSON
bodies {"code", "type", "message"} come back here as ServerRefused with that status, type and message.
Subclasses also derive from the built-in error a caller would expect (TypeError, ValueError), so
`except TypeError` keeps working.
"""

from __future__ import annotations


class SegservError(Exception):
    """A request could not be done: `status` is the HTTP status (0 when there was no HTTP answer), `type` the
    server's error type (e.g. "invalid_image", "InvalidKeyException") or the client's, and `message` says what
    went wrong and how to fix it. predict_many yields these in place of a result, with `index` and `source`
    naming the input they belong to."""

    def __init__(self, status: int, type: str, message: str):
        # Status 0 means no HTTP answer at all (unreachable server, unreadable file): leave it out.
        super().__init__(f"{status} {type}: {message}" if status else f"{type}: {message}")
        self.status, self.type, self.message = status, type, message
        self.index: int | None = None
        self.source: object = None

    def __reduce__(self):  # the three fields, not Exception's single formatted one: errors cross processes
        return type(self), (self.status, self.type, self.message)

    def copy_for(self, index: int | None, source: object) -> SegservError:
        """The same error, tagged for another input (predict_many: the images not sent after a refusal)."""
        other = type(self)(self.status, self.type, self.message)
        other.index, other.source = index, source
        return other


class ServerRefused(SegservError):
    """The server answered with an error status; its JSON error body is in status, type and message."""


class Unreachable(SegservError):
    """No HTTP answer after the retries: the server is down, the URL is wrong or it timed out."""


class InputError(SegservError, ValueError):
    """An image the client cannot send (a file that cannot be read, an array of the wrong shape or dtype)."""


class InputTypeError(InputError, TypeError):
    """The image is of a type the client does not take."""


class FormatError(SegservError, ValueError):
    """The answer's format does not hold what was asked of it (e.g. .mask() of an overlay JPEG)."""


class KeyFileError(SegservError, ValueError):
    """A key file that was named does not exist or is not a TorchServe key_file.json."""
