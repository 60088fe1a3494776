"""`segserve ui`: the try-it page (index.html, app.js, style.css beside this file; no build step), served on
loopback by the standard library's HTTP server.

By default the page's requests (POST /predictions/..., GET /ping) come here and are forwarded to TorchServe
with the inference key added from the key file (read again for each request: keys change when TorchServe
restarts), so the key never reaches the browser. Why not straight to TorchServe: a browser sends a CORS
preflight (OPTIONS, without the Authorization header) before a request that carries a token, and TorchServe
0.12's token check answers it 400, so the browser refuses the call (tests/test_ui.py shows it). With
`--direct` the page calls TorchServe itself, which works when TorchServe's token auth is off and its
`cors_allowed_origin` is this page's origin (`make serve` sets it for http://127.0.0.1:8090).
"""

from __future__ import annotations

import argparse
import json
import sys
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import requests

from ..api import SegservClient, resolve_token

PAGE = Path(__file__).resolve().parent
HTML = ("index.html", "text/html; charset=utf-8")
STATIC = {"/": HTML, "/index.html": HTML, "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
# Bodies the page may send through: above TorchServe's own max_request_size (25 MiB), so that TorchServe, not
# this relay, answers an image that is too large.
MAX_BODY = 64 * 1024 * 1024
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def page_config(client: SegservClient, direct: bool) -> dict:
    """What the page needs to know: where to send predictions, for which model, and whether through here."""
    version = f"/{client.version}" if client.version else ""
    base = client.base_url if direct else ""
    return {"predict_url": f"{base}/predictions/{client.model}{version}", "ping_url": f"{base}/ping",
            "model": client.model, "version": client.version, "server": client.base_url,
            "mode": "direct" if direct else "relay"}


def make_handler(client: SegservClient, direct: bool, token: str | None, key_file: str | None,
                 origin: str) -> type[BaseHTTPRequestHandler]:
    config = json.dumps(page_config(client, direct)).encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "segserve-ui"

        def do_GET(self):  # noqa: N802 - http.server's naming
            path = urlsplit(self.path).path
            if not self._trusted():
                return
            if path in STATIC:
                name, media = STATIC[path]
                return self._send(200, media, (PAGE / name).read_bytes())
            if path == "/config.json":
                return self._send(200, "application/json", config)
            if path == "/ping" and not direct:
                return self._relay("GET", None)
            self._error(404, "not_found", f"{path}: the page is at /")

        def do_POST(self):  # noqa: N802
            path = urlsplit(self.path).path
            if not self._trusted():
                return
            if direct or not path.startswith("/predictions/"):
                return self._error(404, "not_found", f"{path}: this page relays POST /predictions/... only")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._error(413, "payload_too_large", f"{length} bytes is over this page's {MAX_BODY}")
            self._relay("POST", self.rfile.read(length))

        def _trusted(self) -> bool:
            """Only this page's own origin: a request whose Host is not this server's loopback name (DNS
            rebinding) or whose Origin is another site's (a page elsewhere posting here) is refused."""
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            sent_origin = self.headers.get("Origin")
            if host not in LOOPBACK and host != urlsplit(origin).hostname:
                self._error(403, "forbidden", f"Host {host!r} is not this page's ({origin})")
                return False
            sent = urlsplit(sent_origin or "")
            if sent_origin and (sent.hostname not in LOOPBACK or sent.port != urlsplit(origin).port):
                self._error(403, "forbidden", f"requests from {sent_origin} are not this page's ({origin})")
                return False
            return True

        def _relay(self, method: str, body: bytes | None) -> None:
            headers = {k: self.headers[k] for k in FORWARDED_REQUEST_HEADERS if self.headers.get(k)}
            key, _ = resolve_token("inference", token, key_file)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            try:
                answer = client.session.request(method, f"{client.base_url}{self.path}", data=body, headers=headers,
                                                timeout=client.timeout)
            except requests.RequestException as exc:
                return self._error(502, "connection_error", f"cannot reach {client.base_url} ({type(exc).__name__}):"
                                                            " is TorchServe running (`make serve`)?")
            self._send(answer.status_code, answer.headers.get("Content-Type", "application/octet-stream"),
                       answer.content)

        def _error(self, status: int, kind: str, message: str) -> None:
            self._send(status, "application/json", json.dumps({"code": status, "type": kind, "message": message})
                       .encode())

        def _send(self, status: int, media: str, body: bytes) -> None:
            self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "")
            self.send_header("Content-Type", media)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # one line per request on stderr, without the client's address
            sys.stderr.write(f"segserve ui: {format % args}\n")

    return Handler


def make_server(client: SegservClient, host: str = "127.0.0.1", port: int = 8090, direct: bool = False,
                token: str | None = None, key_file: str | None = None, quiet: bool = False) -> ThreadingHTTPServer:
    """The page's HTTP server, bound (port 0: a free one); serve_forever() runs it."""
    server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    origin = f"http://{host}:{server.server_port}"
    server.RequestHandlerClass = make_handler(client, direct, token, key_file, origin)
    if quiet:
        server.RequestHandlerClass.log_message = lambda *args: None
    server.origin = origin  # type: ignore[attr-defined]
    return server


def serve(args: argparse.Namespace) -> int:
    from ..cli import _client

    client = _client(args)
    if args.host not in LOOPBACK:
        print(f"segserve ui: listening on {args.host}, not loopback: whoever reaches it can use the inference key",
              file=sys.stderr)
    try:
        server = make_server(client, args.host, args.port, args.direct, args.token, args.key_file)
    except OSError as exc:
        print(f"segserve ui: cannot listen on {args.host}:{args.port} ({exc.strerror}): pick another --port",
              file=sys.stderr)
        return 2
    _, found = resolve_token("inference", args.token, args.key_file)
    print(f"segserve ui: {server.origin}/ -> {client.base_url} "
          f"({'direct: the page calls TorchServe' if args.direct else f'relayed; key from {found}'}); Ctrl-C stops")
    if args.open:
        webbrowser.open(f"{server.origin}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
