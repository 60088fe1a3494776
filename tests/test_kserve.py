"""KServe: the manifests against KServe's CRD schemas and Kubernetes' core schemas (offline), what a
hardened cluster asks of them, and TorchServe started on the `make kserve-layout` layout exactly as KServe's
TorchServe runtime starts it."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
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
SCHEMAS = {"InferenceService": "inferenceservice-v1beta1.json", "ServingRuntime": "servingruntime-v1alpha1.json",
           "NetworkPolicy": "networkpolicy-networking-v1.json"}
API_VERSIONS = {"InferenceService": "serving.kserve.io/v1beta1", "ServingRuntime": "serving.kserve.io/v1alpha1",
                "NetworkPolicy": "networking.k8s.io/v1"}
BENCH = REPO / "docs" / "bench" / "cpu-redesign.json"  # the committed `make bench` run docs/performance.md reports
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
    assert doc["apiVersion"] == API_VERSIONS[doc["kind"]]
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


def manifest(name: str) -> dict:
    return yaml.safe_load((KSERVE / name).read_text())


def test_runtime_container_is_hardened_as_the_restricted_pod_security_standard_asks():
    runtime = manifest("servingruntime.yaml")["spec"]
    (container,) = runtime["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000  # the image's USER
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]} and security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in security  # older Knative refuses the field even when false (knative/serving#15643)
    # Writable: only the emptyDir where TorchServe writes (the image's SEGSERVE_WORKDIR; tests/test_container.py
    # runs the image with only that writable).
    image_env = dict(re.findall(r"(SEGSERVE_WORKDIR)=(\S+)", (REPO / "docker" / "Dockerfile").read_text()))
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts) == {image_env["SEGSERVE_WORKDIR"]}
    assert {v["name"] for v in runtime["volumes"] if "emptyDir" in v} == set(mounts.values())
    for name in ("inferenceservice.yaml", "inferenceservice-gpu.yaml"):
        predictor = manifest(name)["spec"]["predictor"]
        assert predictor["automountServiceAccountToken"] is False
        assert "securityContext" not in predictor["model"]  # the runtime's applies, not replaced


def test_probes_use_no_expiring_key_and_check_ready_workers():
    (container,) = manifest("servingruntime.yaml")["spec"]["containers"]
    probe = ["python", "-m", "segserve.tools.probe"]
    assert container["startupProbe"]["exec"]["command"] == probe
    assert container["readinessProbe"]["exec"]["command"] == probe  # READY workers, not /ping alone
    assert container["livenessProbe"]["exec"]["command"] == [*probe, "--ping-only"]
    # The model may take a while to load: the startup probe's window covers the archive's startupTimeout.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2 * yaml.safe_load(
        (REPO / "model" / "model-config.yaml").read_text())["startupTimeout"]
    # No key in the pod: KServe's layout turns token auth off; the probe renews a key if it were on.
    assert "Authorization" not in json.dumps(container)


def test_sigterm_drain_fits_in_kubernetes_grace_period():
    """The entrypoint's drain, then TorchServe's own 2-4 s stop, within the default 30 s grace period."""
    (container,) = manifest("servingruntime.yaml")["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert float(env["SEGSERVE_DRAIN_SECONDS"]) + 5 <= 30
    for name in ("inferenceservice.yaml", "inferenceservice-gpu.yaml"):
        assert "terminationGracePeriodSeconds" not in manifest(name)["spec"]["predictor"]


def test_autoscaling_target_is_the_concurrency_where_bench_throughput_peaks():
    """Knative's concurrency target per replica: the fewest concurrent clients at which the committed
    `make bench` run reached (within 10%) its best served images/s; more only queue."""
    results = [r for r in json.loads(BENCH.read_text())["results"]
               if r["workload"] == "segmenter" and r["contender"] == "segserve"]
    best = max(r["images_per_s"] for r in results)
    target = min(r["concurrency"] for r in results if r["images_per_s"] >= 0.9 * best)
    predictor = manifest("inferenceservice.yaml")["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] == target
    # The bench ran on 2 cores with one worker: the replica's CPU is what the target was measured on.
    assert json.loads(BENCH.read_text())["machine"]["cpus"] == int(predictor["model"]["resources"]["limits"]["cpu"])


def test_network_policy_admits_only_the_inference_port_of_our_pods():
    policy = manifest("networkpolicy.yaml")["spec"]
    (container,) = manifest("servingruntime.yaml")["spec"]["containers"]
    (inference_port,) = [p["containerPort"] for p in container["ports"]]
    names = {manifest(n)["metadata"]["name"] for n in ("inferenceservice.yaml", "inferenceservice-gpu.yaml")}
    (selector,) = policy["podSelector"]["matchExpressions"]
    assert selector["key"] == "serving.kserve.io/inferenceservice" and set(selector["values"]) == names
    assert policy["policyTypes"] == ["Ingress"]
    open_to_all, autoscaler = policy["ingress"]
    assert "from" not in open_to_all and {p["port"] for p in open_to_all["ports"]} == {inference_port, 8012}
    assert autoscaler["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "knative-serving"}}}] and [p["port"] for p in autoscaler["ports"]] == [9090]
    metrics_port = int(manifest("servingruntime.yaml")["spec"]["annotations"]["prometheus.kserve.io/port"])
    assert metrics_port not in {p["port"] for rule in policy["ingress"] for p in rule["ports"]}


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
def test_torchserve_started_like_kserve_runtime_serves_v2_batches_and_v1(tmp_path, model_store, reference):
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
        # The v1 the runtime also lists: instances in, one prediction per instance out.
        instances = [{"b64": base64.b64encode(encode_image(Image.fromarray(im))).decode()} for im in images[:2]]
        v1 = requests.post(f"{url}/v1/models/{MODEL}:predict", json={"instances": instances, "format": "png"},
                           timeout=120)
        assert v1.status_code == 200, v1.text[:300]
        for prediction, mask in zip(v1.json()["predictions"], expected[:2], strict=True):
            assert (np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["b64"])))) == mask).all()
    finally:
        subprocess.run([torchserve, "--stop"], cwd=workdir, env=env, timeout=60, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
