"""The segserve client and CLI: talk HTTP to a segserve server.

Needs requests, numpy, Pillow and tqdm only (no torch, no TorchServe): `pip install segserve` installs just
this; the `server` extra adds what a TorchServe worker and the build tools need.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from .aio import AsyncSegservClient
from .api import DEFAULT_URL, ImageInput, Prediction, SegservClient, read_key, resolve_token
from .errors import (
    FormatError,
    InputError,
    InputTypeError,
    KeyFileError,
    SegservError,
    ServerRefused,
    Unreachable,
)

try:
    __version__ = _version("segserve")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown (not installed: pip install -e .)"

__all__ = ["DEFAULT_URL", "AsyncSegservClient", "FormatError", "ImageInput", "InputError", "InputTypeError",
           "KeyFileError", "Prediction", "SegservClient", "SegservError", "ServerRefused", "Unreachable",
           "__version__", "read_key", "resolve_token"]
