#!/usr/bin/env python3
"""Container entrypoint: turn SEGSERVE_* environment variables into TorchServe settings and exec TorchServe.

The settings are SEGSERVE_CONFIG (the image's config.properties) with the overrides the variables ask for
(segserve.tools.torchserve_config.container), written to SEGSERVE_WORKDIR/config.properties. Needs only
the installed segserve package (`server` extra), so it runs and is tested outside a container too.

    entrypoint.py                        serve the model store with settings from the environment
    entrypoint.py torchserve --start ... run that TorchServe command (what KServe's runtime passes),
                                         kept in the foreground so the container lives as long as it
    entrypoint.py <anything else>        exec it (e.g. a shell for debugging)

Environment (defaults in brackets):
    SEGSERVE_MODEL_STORE      [/home/model-server/model-store]  archives to serve
    SEGSERVE_CONFIG           [/home/model-server/config.properties]  TorchServe settings
    SEGSERVE_MODELS           [all]  archives to load: "all" or NAME=FILE.mar,...
    SEGSERVE_BIND             [0.0.0.0]  address the APIs listen on inside the container
    SEGSERVE_INFERENCE_PORT / SEGSERVE_MANAGEMENT_PORT / SEGSERVE_METRICS_PORT  [8080 / 8081 / 8082]
    SEGSERVE_GRPC_INFERENCE_PORT / SEGSERVE_GRPC_MANAGEMENT_PORT  [7070 / 7071]
    SEGSERVE_WORKERS          [from the archive's model-config.yaml]  workers per model at start
    SEGSERVE_TOKEN_AUTH       [true]  "false" turns TorchServe's token auth off (private networks only)
    SEGSERVE_WORKDIR          [current directory]  where key_file.json and logs/ are written
Any TS_<KEY> variable overrides <key> of the written config.properties (enable_envvars_config).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from segserve.tools import torchserve_config

DEFAULTS = {
    "SEGSERVE_MODEL_STORE": "/home/model-server/model-store",
    "SEGSERVE_CONFIG": "/home/model-server/config.properties",
    "SEGSERVE_MODELS": "all",
    "SEGSERVE_BIND": "0.0.0.0",
    "SEGSERVE_INFERENCE_PORT": "8080",
    "SEGSERVE_MANAGEMENT_PORT": "8081",
    "SEGSERVE_METRICS_PORT": "8082",
    "SEGSERVE_GRPC_INFERENCE_PORT": "7070",
    "SEGSERVE_GRPC_MANAGEMENT_PORT": "7071",
    "SEGSERVE_WORKERS": "",
    "SEGSERVE_TOKEN_AUTH": "true",
    "SEGSERVE_WORKDIR": "",
}


class EnvironmentSettingError(ValueError):
    """A SEGSERVE_* variable is missing or malformed (model-config.yaml's errors are segserve.config.ConfigError)."""


def setting(env: dict[str, str], name: str) -> str:
    return env.get(name, DEFAULTS[name]).strip()


def port(env: dict[str, str], name: str) -> str:
    value = setting(env, name)
    if not re.fullmatch(r"\d{1,5}", value) or not 0 < int(value) < 65536:
        raise EnvironmentSettingError(f"{name} must be a port number, got {value!r}")
    return value


def flag(env: dict[str, str], name: str) -> bool:
    value = setting(env, name).lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise EnvironmentSettingError(f"{name} must be true or false, got {value!r}")
    return value in ("true", "1", "yes")


def archives(store: Path, models: str) -> dict[str, Path]:
    """name -> .mar path for SEGSERVE_MODELS ("all", or NAME=FILE.mar / FILE.mar, comma-separated)."""
    if models.lower() == "all":
        found = {path.stem: path for path in sorted(store.glob("*.mar"))}
    else:
        found = {}
        for item in filter(None, (m.strip() for m in models.split(","))):
            name, _, file = item.rpartition("=")
            found[name or Path(file).stem] = store / file
    missing = [str(path) for path in found.values() if not path.is_file()]
    if not found or missing:
        raise EnvironmentSettingError(f"no model archive to serve in {store} (SEGSERVE_MODELS={models!r}"
                                      + (f"; missing {', '.join(missing)}" if missing else "") + ")")
    return found


def torchserve() -> str:
    here = Path(sys.executable).parent / "torchserve"
    return str(here) if here.is_file() else (shutil.which("torchserve") or "torchserve")


def serve_command(env: dict[str, str], workdir: Path) -> list[str]:
    """The TorchServe command line for serving from SEGSERVE_* settings; writes workdir/config.properties."""
    store = Path(setting(env, "SEGSERVE_MODEL_STORE"))
    config = Path(setting(env, "SEGSERVE_CONFIG"))
    if not config.is_file():
        raise EnvironmentSettingError(f"SEGSERVE_CONFIG {config} not found: mount a config.properties there")
    effective = workdir / "config.properties"
    if effective.resolve() == config.resolve():
        raise EnvironmentSettingError(f"SEGSERVE_WORKDIR {workdir} holds SEGSERVE_CONFIG {config}: the entrypoint "
                                      "writes its own config.properties there; pick another folder for either")
    workers = setting(env, "SEGSERVE_WORKERS")
    if workers and (not workers.isdigit() or int(workers) < 1):
        raise EnvironmentSettingError(f"SEGSERVE_WORKERS must be a whole number >= 1, got {workers!r}")
    ports = {name: port(env, f"SEGSERVE_{name.upper()}_PORT")
             for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    settings = torchserve_config.container(config, bind=setting(env, "SEGSERVE_BIND"), ports=ports,
                                           model_store=store, models=archives(store, setting(env, "SEGSERVE_MODELS")),
                                           workers=int(workers) if workers else None,
                                           token_auth=flag(env, "SEGSERVE_TOKEN_AUTH"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings.write(effective)
    return [torchserve(), "--foreground", "--ncs", "--ts-config", str(effective)]  # the store: its model_store


def passthrough_command(args: list[str]) -> list[str]:
    """A given command; `torchserve --start ...` (KServe's runtime args) stays in the foreground."""
    if Path(args[0]).name == "torchserve" and "--foreground" not in args and "--stop" not in args:
        return [torchserve() if args[0] == "torchserve" else args[0], *args[1:], "--foreground"]
    return args


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    workdir = Path(setting(env, "SEGSERVE_WORKDIR") or os.getcwd())
    try:
        cmd = passthrough_command(argv) if argv else serve_command(env, workdir)
    except (EnvironmentSettingError, OSError) as exc:
        print(f"segserve entrypoint: {exc}", file=sys.stderr)
        return 2
    os.chdir(workdir)  # TorchServe writes key_file.json and logs/ into its working directory
    print("segserve entrypoint: " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
