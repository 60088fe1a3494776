"""TorchServe's settings for every way segserve runs, derived from one file: config.properties.

config.properties (the repository root's; /home/model-server/config.properties in the image) holds every
setting: token auth, the model API, allowed_urls, size limits, timeouts, metrics. Each deployment writes its
own copy of it in which only the keys it must change differ, each as a named Override with its reason:

    local(...)      `make serve` and the integration tests (segserve.tools.server.TorchServe)
    container(...)  the image's entrypoint (docker/entrypoint.py)
    kserve(...)     `make kserve-layout` (segserve.tools.deploy)

so the security settings, limits and timeouts cannot drift apart (tests/test_torchserve_config.py).
The written file marks each override with its reason. Needs only the standard library and pyyaml (to read
an archive's model-config.yaml for a model_snapshot): docker/entrypoint.py imports it inside the image.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# The HTTP APIs, each with its <api>_address key, and the gRPC ones, each with grpc_<api>_port.
HTTP_APIS = ("inference", "management", "metrics")
GRPC_APIS = ("inference", "management")

# model-config.yaml keys a model_snapshot must carry (TorchServe's names), with TorchServe's defaults.
SNAPSHOT_KEYS = {"batchSize": 1, "maxBatchDelay": 100, "responseTimeout": 120, "startupTimeout": 120}

# `segserve ui`'s default origin (src/segserve/client/ui/, --port 8090). TorchServe sends these CORS headers on
# every answer; a page from this origin may read them. It still cannot send a token: TorchServe's token check
# refuses the browser's preflight (OPTIONS carries no Authorization), so `segserve ui` relays by default.
UI_ORIGIN = "http://127.0.0.1:8090"
UI_CORS = (("cors_allowed_origin", UI_ORIGIN), ("cors_allowed_methods", "GET, POST"),
           ("cors_allowed_headers", "Content-Type, Accept"))

# Why KServe's pods run without TorchServe's token auth: the only security setting a deployment changes.
KSERVE_TOKEN_AUTH_REASON = (
    "Kubernetes probes and KServe's router send no TorchServe token and keys change at every pod start: "
    "token auth is off in the pod; authenticate at the ingress instead (docs/deploy.md)")


@dataclass(frozen=True)
class Override:
    """One key a deployment sets to a value other than config.properties', and why."""

    key: str
    value: str
    reason: str

    def __post_init__(self):
        if not self.key or any(c in self.key for c in "=:# \n") or "\n" in self.value or not self.reason:
            raise ValueError(f"not a TorchServe property override: {self!r}")


@dataclass(frozen=True)
class Settings:
    """config.properties plus one deployment's overrides: what that TorchServe reads."""

    deployment: str
    base: Mapping[str, str]
    overrides: tuple[Override, ...]

    @property
    def properties(self) -> dict[str, str]:
        return {**self.base, **{o.key: o.value for o in self.overrides}}

    def text(self) -> str:
        """The properties file: config.properties' keys in their order, then added ones; overrides marked."""
        by_key = {o.key: o for o in self.overrides}
        lines = [f"# TorchServe settings for {self.deployment}, written by segserve.tools.torchserve_config:",
                 "# config.properties with the overrides marked below. Change config.properties, not this file."]
        for key in [*self.base, *(k for k in by_key if k not in self.base)]:
            if key in by_key:
                lines.append(f"# override: {by_key[key].reason}")
            lines.append(f"{key}={by_key[key].value if key in by_key else self.base[key]}")
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(self.text())
        return path


def read_properties(path: Path) -> dict[str, str]:
    """key -> value of a config.properties, in file order (`key=value` lines; `#` comments)."""
    pairs: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs


def derive(base_config: Path, deployment: str, overrides: Iterable[Override]) -> Settings:
    """config.properties at `base_config` with these overrides (one per key)."""
    overrides = tuple(overrides)
    keys = [o.key for o in overrides]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"{deployment}: {', '.join(twice)} overridden twice")
    return Settings(deployment, read_properties(base_config), overrides)


def addresses(scheme: str, host: str, ports: Mapping[str, int | str], reason: str) -> list[Override]:
    """<api>_address for each HTTP API and grpc_<api>_port for each gRPC API named in `ports`
    (keys "inference", "management", "metrics", "grpc_inference", "grpc_management")."""
    found = [Override(f"{api}_address", f"{scheme}://{host}:{ports[api]}", reason) for api in HTTP_APIS if api in ports]
    found += [Override(f"grpc_{api}_port", str(ports[f"grpc_{api}"]), reason)
              for api in GRPC_APIS if f"grpc_{api}" in ports]
    return found


# -- the three deployments ----------------------------------------------------------------------------
def local(base_config: Path, *, host: str, ports: Mapping[str, int], model_store: Path,
          models: Iterable[str] = (), tls: tuple[Path, Path] | None = None,
          extra: Iterable[tuple[str, str]] = ()) -> Settings:
    """`make serve` and the tests: this instance's own loopback ports (several run side by side), its store
    and models, TLS when asked for, and what the caller adds (`extra`, e.g. enable_model_api for a test)."""
    overrides = addresses("https" if tls else "http", host, ports, "this instance's own ports")
    overrides.append(Override("model_store", str(Path(model_store).resolve()), "this instance's model store"))
    overrides += [Override(key, value, "`segserve ui --direct` on its default port may read the answers")
                  for key, value in UI_CORS if key not in dict(extra)]
    models = tuple(models)
    if models:
        overrides.append(Override("load_models", ",".join(models), "the models this instance loads"))
    if tls:
        certificate, key = (Path(p).resolve() for p in tls)
        overrides += [Override("certificate_file", str(certificate), "TLS: SEGSERVE_TLS_CERT"),
                      Override("private_key_file", str(key), "TLS: SEGSERVE_TLS_KEY")]
    overrides += [Override(key, value, "asked for by the caller (extra_properties)") for key, value in extra]
    return derive(base_config, "a local TorchServe (segserve.tools.server)", overrides)


def container(base_config: Path, *, bind: str, ports: Mapping[str, int | str], model_store: Path,
              models: Mapping[str, Path], workers: int | None = None, token_auth: bool = True) -> Settings:
    """The image's entrypoint: SEGSERVE_BIND and the SEGSERVE_*_PORT ports, SEGSERVE_MODEL_STORE,
    SEGSERVE_MODELS, SEGSERVE_WORKERS (a model_snapshot) and SEGSERVE_TOKEN_AUTH=false."""
    overrides = addresses("http", bind, ports, "SEGSERVE_BIND and SEGSERVE_*_PORT: where the APIs listen")
    overrides += [Override("model_store", str(model_store), "SEGSERVE_MODEL_STORE"),
                  Override("load_models", ",".join(f"{name}={path.name}" for name, path in models.items()),
                           "SEGSERVE_MODELS")]
    if workers is not None:
        overrides.append(Override("model_snapshot", model_snapshot(models, workers),
                                  "SEGSERVE_WORKERS: workers per model (a snapshot wins over load_models)"))
    if not token_auth:
        overrides.append(Override("disable_token_authorization", "true",
                                  "SEGSERVE_TOKEN_AUTH=false: token auth off (private networks only)"))
    return derive(base_config, "the container (docker/entrypoint.py)", overrides)


def kserve(base_config: Path, models: Mapping[str, Path], workers: int | None = None) -> Settings:
    """KServe's TorchServe runtime (`torchserve --start --model-store=/mnt/models/model-store
    --ts-config=/mnt/models/config/config.properties`, /mnt/models being the storageUri)."""
    overrides = [
        Override("inference_address", "http://0.0.0.0:8080",
                 "KServe sends traffic to the container's port 8080; 0.0.0.0 inside a pod is the pod's own network "
                 "namespace, reached through the Service KServe creates (management stays on the pod's loopback)"),
        Override("metrics_address", "http://0.0.0.0:8082", "Prometheus scrapes the pod's port 8082 (0.0.0.0: the pod's "
                 "own network namespace)"),
        Override("model_store", "/mnt/models/model-store", "KServe mounts the storageUri at /mnt/models"),
        Override("model_snapshot", model_snapshot(models, workers),
                 "KServe's runtime passes no --models: the snapshot names the models, with each archive's "
                 "workers, batch size, batch delay and timeouts (it wins over model-config.yaml and load_models)"),
        Override("disable_token_authorization", "true", KSERVE_TOKEN_AUTH_REASON),
    ]
    return derive(base_config, "KServe (make kserve-layout)", overrides)


# -- model_snapshot -----------------------------------------------------------------------------------
def archive_settings(mar: Path) -> tuple[str, dict]:
    """(model version, snapshot settings) from an archive's MANIFEST.json and model-config.yaml."""
    import yaml  # the `server` extra: only a snapshot needs it

    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
        config_name = manifest.get("configFile") or "model-config.yaml"
        config = yaml.safe_load(archive.read(config_name)) if config_name in archive.namelist() else {}
    settings = {key: int((config or {}).get(key, default)) for key, default in SNAPSHOT_KEYS.items()}
    settings["minWorkers"] = int((config or {}).get("minWorkers", 1))
    settings["maxWorkers"] = int((config or {}).get("maxWorkers", settings["minWorkers"]))
    return str(manifest.get("modelVersion", "1.0")), settings


def model_snapshot(models: Mapping[str, Path], workers: int | None = None) -> str:
    """TorchServe's `model_snapshot` value for these archives (name -> .mar path); `workers` sets
    min and max workers of each, else the archive's own."""
    entries = {}
    for name, mar in models.items():
        version, settings = archive_settings(mar)
        if workers is not None:
            settings["minWorkers"] = settings["maxWorkers"] = workers
        entries[name] = {version: {"defaultVersion": True, "marName": Path(mar).name, **settings}}
    return json.dumps({"name": "startup.cfg", "modelCount": len(entries), "models": entries}, separators=(",", ":"))
