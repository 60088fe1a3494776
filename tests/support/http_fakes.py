"""Small real HTTP servers for the client-side tests (client, CLI, the UI's relay): a request handler base that
answers bytes or JSON, a multipart form reader, and a context manager that serves one on a loopback port.

Hand-written over http.server because a test wants a server that misbehaves on cue (503s, refusals) with
nothing to install; the client under test talks real HTTP to it."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import Any


class Answering(BaseHTTPRequestHandler):
    """A quiet request handler with two ways to answer."""

    def send_body(self, status: int, media: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def send_json(self, status: int, doc: Any) -> None:
        self.send_body(status, "application/json", json.dumps(doc).encode())

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, *args):  # the tests' output stays the tests'
        pass


def form_fields(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body's parts, by field name: (filename, content)."""
    raw = f"Content-Type: {content_type}\r\n\r\n".encode() + body
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in BytesParser(policy=HTTP).parsebytes(raw).iter_parts()}


def loopback(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threading server for `handler` on 127.0.0.1, on a port the system picks."""
    return ThreadingHTTPServer(("127.0.0.1", 0), handler)


@contextlib.contextmanager
def serving(httpd: HTTPServer) -> Iterator[str]:
    """Serve `httpd` from a daemon thread for the block; yields its base URL; then shuts it down and closes it."""
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
