"""The worker log names each failed request (TorchServe's request id, sent to the client as x-request-id)
and the reason, and never carries image data."""

from __future__ import annotations

import base64
import json
import os

import pytest
import requests
from support import MODEL
from test_security import wait_for_log_line

pytestmark = pytest.mark.integration


def test_a_refused_request_is_logged_by_id_and_reason_without_its_bytes(server):
    junk = os.urandom(3000)  # not an image; random so that any copy of it in the log would be found
    encoded = base64.b64encode(junk).decode()
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", data=json.dumps({"image": encoded}),
                             headers={**server.headers(), "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["type"] == "invalid_image"
    request_id = response.headers["x-request-id"]
    line = wait_for_log_line(server, rf"request {request_id} refused: 400 invalid_image: ")
    assert response.json()["message"] in line
    logs = "".join(p.read_text(errors="replace") for p in server.log_dir.glob("*.log"))
    for piece in (encoded[:40], encoded[-40:], encoded[1000:1040]):
        assert piece not in logs
    assert junk[:16].hex() not in logs and repr(junk[:16])[2:-1] not in logs
