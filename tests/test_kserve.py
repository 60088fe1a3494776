"""KServe: the manifests against KServe's CRD schemas (offline), and TorchServe started on the
`make kserve-layout` layout exactly as KServe's TorchServe runtime starts it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest
import requests
import yaml
from PIL import Image
from support import MODEL, REPO, encode_image
from v2_client import image_input, mask_output, parse, request_body

from segserve.tools.deploy import kserve_layout
from segserve.tools.server import free_ports, java_environment
from segserve.tools.synthetic import generate_scene
from segserve.tools.torchserve_config import read_properties

KSERVE = REPO / "deploy" / "kserve"
SCHEMAS = {"InferenceService": "inferenceservice-v1beta1.json", "ServingRuntime": "servingruntime-v1alpha1.json"}
MANIFESTS = sorted(KSERVE.glob("*.yaml"))
# Kubernetes object names (DNS-1035 labels for Services, which KServe creates from the name).
NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def unknown_fields(value, schema, path="") -> list[str]:
    """Fields the schema does not declare: Kubernetes would silently prune them (kubectl --validate=strict
    refuses them)."""
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
            elif "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_kserve_crd_schema(path):
    doc = yaml.safe_load(path.read_text())
    schema = json.loads((KSERVE / "schema" / SCHEMAS[doc["kind"]]).read_text())
    jsonschema.validate(doc, schema)  # types, required fields, resource quantity patterns, enums
    assert unknown_fields(doc, schema) == [], "re-run deploy/kserve/schema/vendor.py after adding fields"
    assert doc["apiVersion"] == f"serving.kserve.io/{SCHEMAS[doc['kind']].split('-')[1][:-5]}"
    metadata = doc["metadata"]
    assert NAME.match(metadata["name"]) and len(metadata["name"]) <= 45
    assert all(isinstance(v, str) for v in (metadata.get("annotations") or {}).values()), "quote annotation values"


def test_inference_services_use_our_runtime_with_v2_and_limits():
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())
    (container,) = runtime["spec"]["containers"]
    # The same command line as KServe's kserve-torchserve runtime.
    assert container["args"] == ["torchserve", "--start", "--model-store=/mnt/models/model-store",
                                 "--ts-config=/mnt/models/config/config.properties"]
    for name in ("inferenceservice.yaml", "inferenceservice-gpu.yaml"):
        doc = yaml.safe_load((KSERVE / name).read_text())
        predictor = doc["spec"]["predictor"]
        model = predictor["model"]
        assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
        assert model["modelFormat"]["name"] == runtime["spec"]["supportedModelFormats"][0]["name"]
        assert model["resources"]["requests"] == model["resources"]["limits"]  # Guaranteed QoS: steady latency
        assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
        assert "serviceEnvelope" not in (doc["metadata"].get("labels") or {})  # kservev2 breaks batching
    gpu = yaml.safe_load((KSERVE / "inferenceservice-gpu.yaml").read_text())["spec"]["predictor"]["model"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_layout_has_what_kserve_reads(tmp_path, model_store):
    config = kserve_layout(tmp_path / "kserve", [model_store / f"{MODEL}.mar"], REPO / "config.properties", workers=2)
    assert config == tmp_path / "kserve" / "config" / "config.properties"
    assert (tmp_path / "kserve" / "model-store" / f"{MODEL}.mar").is_file()
    properties = read_properties(config)
    assert properties["inference_address"] == "http://0.0.0.0:8080"
    assert properties["management_address"].startswith("http://127.0.0.1:")
    assert properties["disable_token_authorization"] == "true"
    snapshot = json.loads(properties["model_snapshot"])
    entry = snapshot["models"][MODEL]["1.0"]
    assert entry["marName"] == f"{MODEL}.mar" and entry["minWorkers"] == entry["maxWorkers"] == 2
    assert (entry["batchSize"], entry["maxBatchDelay"]) == (4, 5)  # from the archive's model-config.yaml


@pytest.mark.integration
def test_torchserve_started_like_kserve_runtime_serves_v2_batches(tmp_path, model_store, reference):
    layout = tmp_path / "mnt" / "models"
    config = kserve_layout(layout, [model_store / f"{MODEL}.mar"], REPO / "config.properties")
    ports = free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management")
    # Only the addresses move (to free loopback ports, so tests can run side by side).
    properties = read_properties(config)
    properties.update({f"{api}_address": f"http://127.0.0.1:{ports[api]}" for api in ("inference", "management",
                                                                                      "metrics")})
    properties.update({f"grpc_{api}_port": str(ports[f"grpc_{api}"]) for api in ("inference", "management")})
    config.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    workdir, tmp = tmp_path / "work", tmp_path / "tmp"
    workdir.mkdir()
    tmp.mkdir()
    env = {**os.environ, **java_environment(), "TMPDIR": str(tmp), "TEMP": str(tmp),
           "LOG_LOCATION": str(workdir / "logs"), "METRICS_LOCATION": str(workdir / "logs")}
    torchserve = str(Path(sys.executable).parent / "torchserve")
    # KServe's kserve-torchserve runtime: torchserve --start --model-store=... --ts-config=...
    with open(tmp_path / "torchserve.out", "wb") as out:  # the daemon keeps the file, not a pipe we wait on
        subprocess.run([torchserve, "--start", f"--model-store={layout}/model-store", f"--ts-config={config}"],
                       cwd=workdir, env=env, check=True, timeout=60, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{ports['inference']}"
        deadline = time.monotonic() + 240
        while True:  # the readiness probe: /ping without a token, then a READY worker
            try:
                ping = requests.get(f"{url}/ping", timeout=5)
                described = requests.get(f"http://127.0.0.1:{ports['management']}/models/{MODEL}", timeout=5)
                if ping.status_code == 200 and any(w["status"] == "READY" for w in described.json()[0]["workers"]):
                    break
            except (requests.RequestException, ValueError, KeyError, IndexError):
                pass
            assert time.monotonic() < deadline, f"not ready; see {workdir / 'logs'}"
            time.sleep(1)
        images = [generate_scene(300 + i, (128, 96))[0] for i in range(8)]
        bodies = [request_body(image_input(encode_image(Image.fromarray(im)), True), [mask_output(False)])
                  for im in images]
        with ThreadPoolExecutor(8) as pool:  # no Authorization header: token auth is off in the pod
            responses = list(pool.map(lambda b: requests.post(f"{url}/v2/models/{MODEL}/infer", data=b[0],
                                                              headers=b[1], timeout=120), bodies))
        expected = reference.predict([Image.fromarray(im) for im in images])
        for response, mask in zip(responses, expected, strict=True):
            assert response.status_code == 200, response.text[:300]
            assert (parse(response.content, response.headers).as_numpy("mask") == mask).all()
        log = (workdir / "logs" / "model_log.log").read_text(errors="replace")
        assert max(int(n) for n in re.findall(r"segserve batch: (\d+) requests", log)) > 1
    finally:
        subprocess.run([torchserve, "--stop"], cwd=workdir, env=env, timeout=60, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
