"""config.properties is the one source of TorchServe's settings: `make serve`/the tests, the container's
entrypoint and `make kserve-layout` each write it with only their named overrides, so token auth, the model
API, allowed_urls, the size limits and the timeouts cannot drift apart again."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest
from support import MODEL, REPO
from test_docker_entrypoint import load_entrypoint

from segserve.tools import torchserve_config
from segserve.tools.deploy import kserve_layout
from segserve.tools.server import TorchServe
from segserve.tools.torchserve_config import KSERVE_TOKEN_AUTH_REASON, Override, read_properties

BASE = REPO / "config.properties"
# Settings no deployment may change (KServe's token auth is the one named exception, below).
PINNED = ("disable_token_authorization", "token_expiration_min", "enable_model_api", "allowed_urls",
          "max_request_size", "max_response_size", "default_response_timeout", "default_startup_timeout",
          "install_py_dep_per_model")
ADDRESSES = {"inference_address", "management_address", "metrics_address", "grpc_inference_port",
             "grpc_management_port"}
# What each deployment may override: where it listens, its store and models. Anything else is drift.
MAY_OVERRIDE = {
    "local": ADDRESSES | {"model_store", "load_models", "cors_allowed_origin", "cors_allowed_methods",
              "cors_allowed_headers"},
    "container": ADDRESSES | {"model_store", "load_models", "model_snapshot"},
    "kserve": {"inference_address", "metrics_address", "model_store", "model_snapshot", "disable_token_authorization"},
}


def written(deployment: str, tmp_path: Path, model_store: Path) -> Path:
    """The config.properties each deployment writes, through its own code path."""
    if deployment == "local":  # make serve and the integration tests
        ts = TorchServe(workdir=tmp_path, model_store=model_store, base_config=BASE,
                        ports={"inference": 18080, "management": 18081, "metrics": 18082, "grpc_inference": 17070,
                               "grpc_management": 17071}, models=(f"{MODEL}={MODEL}.mar",))
        return ts.write_config()
    if deployment == "container":  # docker/entrypoint.py with the image's defaults, workers set
        env = {"SEGSERVE_MODEL_STORE": str(model_store), "SEGSERVE_CONFIG": str(BASE), "SEGSERVE_WORKERS": "2"}
        cmd = load_entrypoint().serve_command(env, tmp_path)
        return Path(cmd[cmd.index("--ts-config") + 1])
    return kserve_layout(tmp_path / "kserve", [model_store / f"{MODEL}.mar"], BASE)  # make kserve-layout


def marked_overrides(path: Path) -> dict[str, str]:
    """key -> reason of every `# override: <reason>` line and the key line after it."""
    lines = path.read_text().splitlines()
    return {line.split("=", 1)[0]: lines[i - 1].removeprefix("# override: ") for i, line in enumerate(lines)
            if i and lines[i - 1].startswith("# override: ")}


def read_by_torchserve(key: str) -> bool:
    """Whether TorchServe 0.12's ConfigManager names this key: a CONSTANT_Utf8 entry of its class file."""
    jar = Path(importlib.util.find_spec("ts").origin).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as archive:
        data = archive.read("org/pytorch/serve/util/ConfigManager.class")
    return b"\x01" + len(key).to_bytes(2, "big") + key.encode() in data


def test_config_properties_is_secure_and_every_key_is_one_torchserve_reads():
    base = read_properties(BASE)
    # TorchServe 0.12 reads disable_token_authorization (default false); enable_token_auth is no key of it.
    assert base["disable_token_authorization"] == "false" and "enable_token_auth" not in base
    assert base["enable_model_api"] == "false" and base["allowed_urls"] == "(?!)"
    assert int(base["max_request_size"]) > 0 and int(base["max_response_size"]) > 0
    assert int(base["default_response_timeout"]) > 0 and int(base["default_startup_timeout"]) > 0
    assert int(base["token_expiration_min"]) > 0
    assert all(base[key].startswith("http://127.0.0.1:") for key in ("inference_address", "management_address",
                                                                      "metrics_address"))
    assert read_by_torchserve("disable_token_authorization") and not read_by_torchserve("enable_token_auth")
    assert [key for key in base if not read_by_torchserve(key)] == []


@pytest.mark.parametrize("deployment", ["local", "container", "kserve"])
def test_each_deployment_is_config_properties_with_only_its_named_overrides(deployment, tmp_path, model_store):
    base = read_properties(BASE)
    path = written(deployment, tmp_path, model_store)
    properties, marked = read_properties(path), marked_overrides(path)
    assert set(base) <= set(properties)
    changed = {key for key in properties if properties[key] != base.get(key)}
    assert changed <= set(marked), f"changed without a named override: {sorted(changed - set(marked))}"
    unexpected = set(marked) - MAY_OVERRIDE[deployment]
    assert not unexpected, f"overrides no {deployment} deployment should need: {sorted(unexpected)}"
    assert all(reason.strip() for reason in marked.values())
    for key in PINNED:
        if deployment == "kserve" and key == "disable_token_authorization":
            # The one security override, documented: probes and KServe's router send no token.
            assert properties[key] == "true" and marked[key] == KSERVE_TOKEN_AUTH_REASON
            assert "probes" in marked[key] and "ingress" in marked[key]
        else:
            assert properties[key] == base[key], key
    assert [key for key in properties if not read_by_torchserve(key)] == []


def test_written_files_say_the_same_as_the_settings_objects(tmp_path, model_store):
    """The file TorchServe reads and Settings.properties agree (comments carry no setting)."""
    settings = torchserve_config.kserve(BASE, {MODEL: model_store / f"{MODEL}.mar"}, workers=3)
    path = settings.write(tmp_path / "config.properties")
    assert read_properties(path) == settings.properties
    assert {o.key: o.reason for o in settings.overrides} == marked_overrides(path)


def test_an_override_needs_a_key_a_one_line_value_and_a_reason():
    for bad in (("", "v", "why"), ("a=b", "v", "why"), ("key", "two\nlines", "why"), ("key", "v", "")):
        with pytest.raises(ValueError):
            Override(*bad)
    with pytest.raises(ValueError, match="model_store overridden twice"):
        torchserve_config.derive(BASE, "test", [Override("model_store", "a", "one"),
                                                Override("model_store", "b", "two")])


def test_container_and_make_serve_settings_differ_only_in_where_they_listen_and_what_they_load(tmp_path, model_store):
    """The entrypoint's config.properties and make serve's, side by side: one source, so only the keys each
    deployment must set differ (tests/test_container.py checks the file TorchServe reads in the image)."""
    (tmp_path / "local").mkdir()
    local = read_properties(written("local", tmp_path / "local", model_store))
    container = read_properties(written("container", tmp_path / "container", model_store))
    differing = {key for key in set(local) | set(container) if local.get(key) != container.get(key)}
    # make serve also sends CORS headers for segserve ui's loopback page (torchserve_config.UI_CORS).
    cors = {key for key, _ in torchserve_config.UI_CORS}
    assert differing <= ADDRESSES | cors | {"model_store", "load_models", "model_snapshot"}, sorted(differing)
    assert {key: local[key] for key in PINNED} == {key: container[key] for key in PINNED}
