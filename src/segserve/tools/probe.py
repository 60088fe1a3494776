"""Health probe for a running TorchServe, and TorchServe's keys kept valid past their expiry.

Healthy means: /ping answers 200 and every registered model has at least one READY worker. /ping alone
is not enough: TorchServe answers it Healthy for a model scaled to 0 workers (ApiUtils.isModelHealthy
compares with minWorkers), which then serves nothing.

Keys. With token auth on (TorchServe 0.12's default) the inference key (/ping, predictions) and the
management key expire `token_expiration_min` after they are made; key_file.json, in TorchServe's working
directory, holds both with their "expiration time", and an "API" key that never expires and is good for
one thing only: the token API (`<management>/token?type=inference|management`), which makes a new key of
that type and rewrites key_file.json (pytorch/serve docs/token_authorization_api.md; the frontend's
TokenAuthorization.java). A probe that read the keys once would fail for good after the expiry, so
`KeyFile.key` renews a key that has expired (or is about to) with the API key, and only then: a key
that is still valid is never replaced under the clients that use it. Rejected keys come back as HTTP
400 with type InvalidKeyException (TorchServe maps it like a bad request).

Used by the image's HEALTHCHECK and the KServe exec probes (`python -m segserve.tools.probe`) and by
`make serve`'s wait (segserve.tools.server). Standard library only: it runs every few seconds in a pod.

    python -m segserve.tools.probe [--inference-url URL] [--management-url URL] [--key-file PATH]
                                   [--cacert PEM] [--timeout S] [--ping-only]
Defaults: http://127.0.0.1:$SEGSERVE_INFERENCE_PORT (8080) and :$SEGSERVE_MANAGEMENT_PORT (8081), and
$SEGSERVE_WORKDIR/key_file.json (else ./key_file.json; none: token auth is off). Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

APIS = ("inference", "management")
# Renew a key this long before its expiry: a probe or wait that uses it must not see it lapse mid-call.
RENEW_MARGIN = timedelta(seconds=5)


class ProbeError(RuntimeError):
    """TorchServe is not healthy, or its keys cannot be read or renewed; the message says which."""


def _context(cafile: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=cafile) if cafile else None


def call(url: str, key: str | None = None, *, method: str = "GET", timeout: float = 5,
         cafile: str | None = None) -> tuple[int, str]:
    """(status, body) of one HTTP request; an HTTP error status is returned, no answer raises ProbeError."""
    request = urllib.request.Request(url, method=method)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=_context(cafile)) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise ProbeError(f"no answer from {url}: {getattr(exc, 'reason', exc)}") from None


def rejected_key(status: int, body: str) -> bool:
    """Whether TorchServe refused the request's key (expired, renewed by someone else, or missing)."""
    return status in (400, 401) and "InvalidKeyException" in body


class KeyFile:
    """TorchServe's key_file.json, with expired keys renewed through the token API."""

    def __init__(self, path: Path, management_url: str, *, cafile: str | None = None, timeout: float = 5):
        self.path = Path(path)
        self.management_url = management_url.rstrip("/")
        self.cafile = cafile
        self.timeout = timeout

    def read(self, wait: float = 2) -> dict:
        """The parsed file. TorchServe rewrites it in place, so a half-written file is read again."""
        deadline = time.monotonic() + wait
        while True:
            try:
                doc = json.loads(self.path.read_text())
                if all(isinstance(doc[api]["key"], str) for api in (*APIS, "API")):
                    return doc
                raise ValueError("a key is not a string")
            except (ValueError, KeyError, TypeError) as exc:
                if time.monotonic() > deadline:
                    raise ProbeError(f"{self.path} is not TorchServe's key file ({exc}); it is rewritten only "
                                     "by TorchServe (token API), do not edit it") from None
            except OSError as exc:
                raise ProbeError(f"cannot read {self.path}: {exc}") from None
            time.sleep(0.1)

    @staticmethod
    def expires(doc: dict, api: str) -> datetime | None:
        """When `api`'s key expires (TorchServe writes an ISO-8601 UTC instant), None if it does not say."""
        text = doc[api].get("expiration time")
        return datetime.fromisoformat(text) if text else None

    def key(self, api: str, now: datetime | None = None) -> str:
        """A valid key for "inference" or "management": the file's, or a new one if it has expired."""
        doc = self.read()
        expiry = self.expires(doc, api)
        if expiry is not None and (now or datetime.now(UTC)) >= expiry - RENEW_MARGIN:
            doc = self.renew(api, doc)
        return doc[api]["key"]

    def renew(self, api: str, doc: dict | None = None) -> dict:
        """Have TorchServe make a new `api` key (the token API, with the non-expiring API key); the new file."""
        doc = doc or self.read()
        old = doc[api]["key"]
        url = f"{self.management_url}/token?{urllib.parse.urlencode({'type': api})}"
        status, body = call(url, doc["API"]["key"], method="POST", timeout=self.timeout, cafile=self.cafile)
        if status != 200:
            raise ProbeError(f"renewing the {api} key failed: {url} answered {status} {body[:200]!r} "
                             f"(is {self.path} this TorchServe's key file?)")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:  # the frontend answers before the file is rewritten only rarely
            doc = self.read()
            if doc[api]["key"] != old:
                return doc
            time.sleep(0.1)
        raise ProbeError(f"TorchServe accepted the renewal but {self.path} still holds the old {api} key")


def authorized(url: str, keys: KeyFile | None, api: str, *, timeout: float = 5,
               cafile: str | None = None) -> tuple[int, str]:
    """GET `url` with a valid `api` key (none when token auth is off); a key refused anyway (renewed by
    another process since we read it, or a clock that disagrees with TorchServe's) is renewed once."""
    key = keys.key(api) if keys else None
    status, body = call(url, key, timeout=timeout, cafile=cafile)
    if keys and rejected_key(status, body):
        current = keys.read()[api]["key"]
        key = current if current != key else keys.renew(api)[api]["key"]
        status, body = call(url, key, timeout=timeout, cafile=cafile)
    return status, body


def check(inference_url: str, management_url: str, keys: KeyFile | None = None, *, timeout: float = 5,
          cafile: str | None = None, ping_only: bool = False) -> str:
    """Raise ProbeError unless /ping is 200 and (unless `ping_only`) every registered model has a READY
    worker; else a one-line summary."""
    try:
        status, body = authorized(f"{inference_url}/ping", keys, "inference", timeout=timeout, cafile=cafile)
        if status != 200:
            raise ProbeError(f"/ping answered {status}: {body[:200]}")
        if ping_only:
            return f"/ping: {body.strip()}"
        status, body = authorized(f"{management_url}/models", keys, "management", timeout=timeout,
                                  cafile=cafile)
        if status != 200:
            raise ProbeError(f"{management_url}/models answered {status}: {body[:200]}")
        models = [m["modelName"] for m in json.loads(body).get("models", [])]
        if not models:
            raise ProbeError("no model registered")
        summary = []
        for model in models:
            url = f"{management_url}/models/{urllib.parse.quote(model, safe='')}"
            status, body = authorized(url, keys, "management", timeout=timeout, cafile=cafile)
            if status != 200:
                raise ProbeError(f"describing {model} answered {status}: {body[:200]}")
            workers = json.loads(body)[0].get("workers", [])
            ready = sum(w.get("status") == "READY" for w in workers)
            if not ready:
                raise ProbeError(f"model {model} has no READY worker ({len(workers)} workers: scale it up with "
                                 f"PUT {management_url}/models/{model}?min_worker=1, or see its worker log)")
            summary.append(f"{model} {ready}/{len(workers)} READY")
        return "Healthy: " + ", ".join(summary)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ProbeError(f"not TorchServe's answer ({type(exc).__name__}: {exc})") from None


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m segserve.tools.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--inference-url", default=f"http://127.0.0.1:{env.get('SEGSERVE_INFERENCE_PORT', '8080')}")
    parser.add_argument("--management-url",
                        default=f"http://127.0.0.1:{env.get('SEGSERVE_MANAGEMENT_PORT', '8081')}")
    parser.add_argument("--key-file", type=Path,
                        default=Path(env.get("SEGSERVE_WORKDIR") or os.getcwd()) / "key_file.json",
                        help="TorchServe's key_file.json (absent: token auth is off)")
    parser.add_argument("--cacert", help="PEM to trust for https:// URLs (a self-signed certificate)")
    parser.add_argument("--timeout", type=float, default=5, help="seconds per HTTP request")
    parser.add_argument("--ping-only", action="store_true",
                        help="liveness: /ping alone (500 only once a model's workers kept failing to start for "
                             "maxRetryTimeoutInSec), not the READY workers a readiness check needs")
    args = parser.parse_args(argv)
    keys = (KeyFile(args.key_file, args.management_url, cafile=args.cacert, timeout=args.timeout)
            if args.key_file.is_file() else None)
    try:
        print(check(args.inference_url.rstrip("/"), args.management_url.rstrip("/"), keys, timeout=args.timeout,
                    cafile=args.cacert, ping_only=args.ping_only))
        return 0
    except ProbeError as exc:
        print(f"unhealthy: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
