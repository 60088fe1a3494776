"""The segserve client and CLI: talk HTTP to a segserve server.

Needs requests, numpy and Pillow only (no torch, no TorchServe): `pip install segserve` installs just
this; the `server` extra adds what a TorchServe worker and the build tools need.
"""

from .api import DEFAULT_URL, Prediction, SegservClient, SegservError, read_key, resolve_token

__all__ = ["DEFAULT_URL", "Prediction", "SegservClient", "SegservError", "read_key", "resolve_token"]
