"""Management beyond docs/operations.md's tested commands: the describe payload against the config, and
a version's predictions refused once it is unregistered (model API on, conftest's ops_server)."""

from __future__ import annotations

import dataclasses

import pytest
import requests
from support import MODEL, encode_image, random_image

pytestmark = pytest.mark.integration


def test_describe_shows_version_architecture_input_size_and_classes(server, config):
    response = requests.get(f"{server.management_url}/models/{MODEL}", params={"customized": "true"},
                            headers=server.headers("management"), timeout=60)
    assert response.status_code == 200
    custom = response.json()[0]["customizedMetadata"]
    assert custom == {
        "model": config.name, "version": config.version, "family": "unet", "arch": config.arch,
        "arch_params": dict(config.arch_params), "head": "softmax",
        "postprocess": {k: v for k, v in dataclasses.asdict(config.postprocess).items() if v is not None},
        "input_size": list(config.input_size),
        "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in config.classes],
    }


def test_an_unregistered_version_stops_answering_and_comes_back_when_registered(ops_server):
    management, headers = f"{ops_server.management_url}/models", ops_server.headers("management")
    body = encode_image(random_image(16, 12))

    def predict(version):
        return requests.post(f"{ops_server.inference_url}/predictions/{MODEL}/{version}", data=body,
                             headers=ops_server.headers(), timeout=60)

    assert predict("1.0").status_code == 200
    assert requests.put(f"{management}/{MODEL}/2.0/set-default", headers=headers, timeout=30).status_code == 200
    # The default version cannot be unregistered while others exist.
    assert requests.delete(f"{management}/{MODEL}/2.0", headers=headers, timeout=60).status_code == 403
    assert requests.delete(f"{management}/{MODEL}/1.0", headers=headers, timeout=60).status_code == 200
    gone = predict("1.0")
    assert gone.status_code == 404 and "1.0" in gone.json()["message"]
    assert predict("2.0").json()["version"] == "2.0"
    again = requests.post(management, params={"url": f"{MODEL}-1.0.mar", "initial_workers": 1, "synchronous": "true"},
                          headers=headers, timeout=240)
    assert again.status_code == 200, again.text
    assert predict("1.0").json()["version"] == "1.0"
    # Leave the server as found (1.0 the default) for the other tests using it.
    assert requests.put(f"{management}/{MODEL}/1.0/set-default", headers=headers, timeout=30).status_code == 200
