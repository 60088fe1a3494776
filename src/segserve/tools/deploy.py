"""Deployment helpers: TorchServe startup snapshots and the storage layout KServe expects.

KServe's TorchServe runtime starts
    torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties
so the storage URI must hold `config/config.properties` and `model-store/*.mar`. Its config
names the models through `model_snapshot` (as KServe's docs show); a snapshot also sets each
model's workers, batch size and batch delay, and wins over the archive's model-config.yaml,
so those are copied from the archive here.

    python -m segserve.tools.deploy kserve-layout --out kserve [--mar model-store/segmenter.mar] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

# model-config.yaml keys a snapshot must carry (TorchServe's names), with TorchServe's defaults.
SNAPSHOT_KEYS = {"batchSize": 1, "maxBatchDelay": 100, "responseTimeout": 120, "startupTimeout": 120}

# TorchServe settings for a KServe pod. Ports: KServe sends traffic to the container's port 8080.
KSERVE_PROPERTIES = """\
# segserve on KServe: written by `make kserve-layout` (segserve.tools.deploy); mounted at /mnt/models/config/.
# Inference and metrics bind 0.0.0.0: inside a pod that is the pod's own network namespace, reached
# through the Service KServe creates (port 8080) and by Prometheus (8082). Management stays on the
# pod's loopback (kubectl exec / port-forward to scale workers): nothing outside the pod needs it.
inference_address=http://0.0.0.0:8080
management_address=http://127.0.0.1:8081
metrics_address=http://0.0.0.0:8082
grpc_inference_port=7070
grpc_management_port=7071
enable_envvars_config=true
# Kubernetes probes and KServe's router send no TorchServe token: token auth is off inside the
# cluster; authenticate at the ingress (e.g. Istio AuthorizationPolicy) instead. See docs/deploy.md.
disable_token_authorization=true
enable_model_api=false
allowed_urls=file://.*\\\\.mar
install_py_dep_per_model=false
metrics_mode=prometheus
model_metrics_auto_detect=true
max_request_size=26214400
max_response_size=104857600
default_response_timeout=120
job_queue_size=200
model_store=/mnt/models/model-store
"""


def archive_settings(mar: Path) -> tuple[str, dict]:
    """(model version, snapshot settings) from an archive's MANIFEST.json and model-config.yaml."""
    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
        config_name = manifest.get("configFile") or "model-config.yaml"
        config = yaml.safe_load(archive.read(config_name)) if config_name in archive.namelist() else {}
    settings = {key: int((config or {}).get(key, default)) for key, default in SNAPSHOT_KEYS.items()}
    settings["minWorkers"] = int((config or {}).get("minWorkers", 1))
    settings["maxWorkers"] = int((config or {}).get("maxWorkers", settings["minWorkers"]))
    return str(manifest.get("modelVersion", "1.0")), settings


def model_snapshot(models: dict[str, Path], workers: int | None = None) -> str:
    """TorchServe's `model_snapshot` value for these archives (name -> .mar path); `workers` sets
    min and max workers of each, else the archive's own."""
    entries = {}
    for name, mar in models.items():
        version, settings = archive_settings(mar)
        if workers is not None:
            settings["minWorkers"] = settings["maxWorkers"] = workers
        entries[name] = {version: {"defaultVersion": True, "marName": mar.name, **settings}}
    return json.dumps({"name": "startup.cfg", "modelCount": len(entries), "models": entries}, separators=(",", ":"))


def kserve_layout(out: Path, mars: list[Path], workers: int | None = None) -> Path:
    """Write out/config/config.properties and out/model-store/*.mar; return the config path."""
    store, config_dir = out / "model-store", out / "config"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    config_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for mar in mars:
        shutil.copy2(mar, store / mar.name)
        models[mar.stem] = store / mar.name
    config = config_dir / "config.properties"
    config.write_text(KSERVE_PROPERTIES + f"model_snapshot={model_snapshot(models, workers)}\n")
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segserve.tools.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    layout = sub.add_parser("kserve-layout", help="write the storage layout KServe's TorchServe runtime expects")
    layout.add_argument("--out", type=Path, default=Path("kserve"))
    layout.add_argument("--mar", type=Path, action="append", help="archive(s) to serve (default: model-store/*.mar)")
    layout.add_argument("--workers", type=int, default=None, help="workers per model (default: the archive's)")
    args = parser.parse_args(argv)
    mars = args.mar or sorted(Path("model-store").glob("*.mar"))
    if not mars:
        print("no archive: run `make mar` first or pass --mar", file=sys.stderr)
        return 2
    config = kserve_layout(args.out, mars, args.workers)
    print(f"KServe layout in {args.out}/: {config.relative_to(args.out)} + "
          + ", ".join(f"model-store/{m.name}" for m in mars))
    print(f"upload it, e.g.: gsutil -m cp -r {args.out}/* gs://<bucket>/segserve/  (storageUri: gs://<bucket>/segserve)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
