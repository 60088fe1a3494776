#!/usr/bin/env python3
"""Container entrypoint: turn SEGSERVE_* environment variables into TorchServe settings and run TorchServe.

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
    SEGSERVE_WORKDIR          [current directory]  everything TorchServe writes: key_file.json, config.properties,
                              logs/ (LOG_LOCATION, METRICS_LOCATION) and tmp/ (TEMP, TMPDIR), unless those are set
    SEGSERVE_DRAIN_SECONDS    [5]  on SIGTERM, how long requests in flight may take to finish before TorchServe
                              stops: its frontend then takes 2-4 s to stop, and Docker's and podman's stop
                              timeout is 10 s (Kubernetes' terminationGracePeriodSeconds: 30 s)
Any TS_<KEY> variable overrides <key> of the written config.properties (enable_envvars_config); the one
exception to the naming in TorchServe 0.12 is token_expiration_min, read from TS_TOKEN_EXPIRATION_TIME_MIN.

TorchServe runs as a child (PID 1 is tini in the image): on SIGTERM the entrypoint waits for the requests in
flight, then stops TorchServe's frontend, which would otherwise drop them (see supervise).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
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
    "SEGSERVE_DRAIN_SECONDS": "5",
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


def is_torchserve(cmd: list[str]) -> bool:
    return Path(cmd[0]).name == "torchserve" and "--stop" not in cmd


def runtime_environment(env: dict[str, str], workdir: Path) -> dict[str, str]:
    """Where TorchServe writes, all under the workdir unless set: TEMP (java.io.tmpdir: the unpacked archives
    and the worker sockets), TMPDIR (its pid file), LOG_LOCATION and METRICS_LOCATION (logs/, config
    snapshots). With those and key_file.json in one folder, a tmpfs there is all a read-only image needs."""
    out = dict(env)
    for name, default in (("TEMP", workdir / "tmp"), ("TMPDIR", workdir / "tmp"), ("LOG_LOCATION", workdir / "logs"),
                          ("METRICS_LOCATION", workdir / "logs")):
        out[name] = out.get(name) or str(default)
        Path(out[name]).mkdir(parents=True, exist_ok=True)
    return out


def inference_ports(cmd: list[str], env: dict[str, str]) -> set[int]:
    """The ports clients send predictions to (HTTP and gRPC inference), from the TorchServe config the command
    names and the TS_* variables that override it (enable_envvars_config)."""
    config = None
    for i, arg in enumerate(cmd):
        if arg.startswith("--ts-config="):
            config = arg.split("=", 1)[1]
        elif arg == "--ts-config" and i + 1 < len(cmd):
            config = cmd[i + 1]
    properties = torchserve_config.read_properties(Path(config)) if config and Path(config).is_file() else {}
    properties.update({k[3:].lower(): v for k, v in env.items() if k.startswith("TS_")})
    address = properties.get("inference_address", "http://127.0.0.1:8080")
    ports = {int(address.rsplit(":", 1)[1].strip("/"))} if re.search(r":\d+/?$", address) else {8080}
    if properties.get("grpc_inference_port", "").isdigit():
        ports.add(int(properties["grpc_inference_port"]))
    return ports


def requests_in_flight(ports: set[int]) -> int:
    """Connections to these ports with a request still being served. TorchServe 0.12 has no drain of its
    own: on SIGTERM its frontend closes every connection at once and the requests on them are lost
    (ModelServer.stop), and it counts no requests in flight. The kernel's TCP state shows them: a
    connection is busy while bytes wait in either queue or it has received data since it last sent any
    (a request, not yet answered); an idle keep-alive connection last sent its answer. `ss` (iproute2)
    reads that per connection (tcp_info lastrcv/lastsnd); without it, every open connection counts."""
    ss = shutil.which("ss")
    if not ss:
        import psutil  # a TorchServe dependency

        return sum(1 for c in psutil.net_connections("inet")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port in ports)
    expression = "( " + " or ".join(f"sport = :{port}" for port in sorted(ports)) + " )"
    listing = subprocess.run([ss, "-H", "-t", "-i", "-n", "state", "established", expression], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    sockets: list[list[str]] = []  # [the socket's line (Recv-Q Send-Q local peer), its indented tcp_info line]
    for line in listing.splitlines():
        if line and not line[0].isspace():
            sockets.append([line, ""])
        elif sockets:
            sockets[-1][1] += line
    busy = 0
    for head, info in sockets:
        recv_q, send_q = (int(n) for n in head.split()[:2])
        last = {key: int(ms) for key, ms in re.findall(r"\b(lastsnd|lastrcv):(\d+)", info)}  # ms ago; 0 is left out
        if recv_q or send_q or last.get("lastrcv", 0) <= last.get("lastsnd", 0):
            busy += 1
    return busy


def supervise(cmd: list[str], env: dict[str, str], drain_seconds: float) -> int:
    """Run TorchServe; on SIGTERM or SIGINT let the requests in flight on the inference ports finish (up to
    drain_seconds), then stop its frontend with SIGTERM. A second signal stops it at once."""
    import psutil

    process = subprocess.Popen(cmd, env=env)
    ports = inference_ports(cmd, env)
    signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
    stopped = False
    while process.poll() is None:
        if signals and not stopped:
            deadline = time.monotonic() + drain_seconds
            waiting = requests_in_flight(ports)
            if waiting:
                print(f"segserve entrypoint: stopping once {waiting} request(s) in flight on port(s) "
                      f"{', '.join(map(str, sorted(ports)))} are answered (at most {drain_seconds:g} s)",
                      file=sys.stderr, flush=True)
            while waiting and len(signals) == 1 and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.1)
                waiting = requests_in_flight(ports)
            # `torchserve --foreground` is a Python launcher that waits on the Java frontend and forwards no
            # signal: the frontend is its child, and stopping it ends the launcher.
            try:
                targets = psutil.Process(process.pid).children() or [process]
            except psutil.NoSuchProcess:
                targets = []
            for target in targets:
                target.send_signal(signal.SIGTERM)
            stopped = True
        time.sleep(0.1)
    return process.returncode


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    workdir = Path(setting(env, "SEGSERVE_WORKDIR") or os.getcwd())
    try:
        cmd = passthrough_command(argv) if argv else serve_command(env, workdir)
        drain = setting(env, "SEGSERVE_DRAIN_SECONDS")
        if not re.fullmatch(r"\d+(\.\d+)?", drain):
            raise EnvironmentSettingError(f"SEGSERVE_DRAIN_SECONDS must be a number of seconds, got {drain!r}")
        if is_torchserve(cmd):
            workdir.mkdir(parents=True, exist_ok=True)
            env = runtime_environment(env, workdir)
    except (EnvironmentSettingError, OSError) as exc:
        print(f"segserve entrypoint: {exc}", file=sys.stderr)
        return 2
    os.chdir(workdir)  # TorchServe writes key_file.json into its working directory
    print("segserve entrypoint: " + " ".join(cmd), file=sys.stderr, flush=True)
    if not is_torchserve(cmd):
        os.execvpe(cmd[0], cmd, env)
    return supervise(cmd, env, float(drain))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
