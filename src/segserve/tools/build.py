"""Build a TorchServe model archive (.mar) that is known to work.

The archive's model-config.yaml is the base config (model/model-config.yaml)
with the architecture, classes, input and version given here. Before anything
is written, the weights are loaded strictly into the architecture and one
forward pass checks the output: a wrong key, shape or class count fails here
with a readable message instead of crash-looping a worker at serve time.
Weights are never unpickled as code: state_dicts are read with safetensors or
torch.load(weights_only=True) and stored in the archive as safetensors. A file
that is code (a --model-file, TorchScript, a torch.export program) is taken
only with --trust-code. Nothing is downloaded (segserve.families.OFFLINE_ENV).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from .. import families, heads
from ..config import ConfigError, ServingConfig, boolean, check_keys, choice, input_shape, whole_number
from ..families import MissingDependencyError, Suggested, build_model, load_state_dict

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # segserve/
REPO = PACKAGE_DIR.parents[1]
# Subpackages of segserve that never run in a worker: the archive ships the rest, the worker modules.
NOT_SHIPPED = ("tools", "client")
# torch-model-archiver as a module of this interpreter: works from a venv and from a PYTHONPATH install alike
# (the GPU check's machine has no venv and no console script).
ARCHIVER = (sys.executable, "-c", "from model_archiver.model_packaging import generate_model_archive as main; main()")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


class BuildError(RuntimeError):
    pass


# -- TorchServe's keys in model-config.yaml ---------------------------------------------------------------
def _whole(minimum: int) -> Callable[[Any, str], Any]:
    return lambda value, where: whole_number(value, where, minimum)


def _lowercase_choice(allowed: tuple[str, ...]) -> Callable[[Any, str], Any]:
    # TorchServe compares these lower-cased.
    return lambda value, where: choice(value.lower() if isinstance(value, str) else value, allowed, where)


def _mapping(value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return value


def _whole_numbers(value: Any, where: str) -> Any:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of whole numbers (GPU ids), got {value!r}")
    for index, item in enumerate(value):
        whole_number(item, f"{where}[{index}]", 0)
    return value


# The top-level keys TorchServe 0.12 reads from model-config.yaml, as its frontend's
# org.pytorch.serve.archive.model.ModelConfig.build switches on them, with the type it accepts: it logs a
# warning and ignores a value of another type, and ignores an unknown key (a typo) without a word.
TORCHSERVE_MODEL_KEYS: dict[str, Callable[[Any, str], Any]] = {
    "minWorkers": _whole(0),
    "maxWorkers": _whole(0),
    "batchSize": _whole(1),
    "maxBatchDelay": _whole(0),
    "responseTimeout": _whole(1),
    "startupTimeout": _whole(1),
    "deviceType": _lowercase_choice(("cpu", "gpu")),
    "parallelType": _lowercase_choice(("pp", "tp", "pptp", "custom")),
    "parallelLevel": _whole(0),
    "deviceIds": _whole_numbers,
    "torchrun": _mapping,
    "maxRetryTimeoutInSec": _whole(1),
    "clientTimeoutInMills": _whole(1),
    "jobQueueSize": _whole(1),
    "useJobTicket": boolean,
    "sequenceMaxIdleMSec": _whole(1),
    "sequenceTimeoutMSec": _whole(1),
    "maxSequenceJobQueueSize": _whole(1),
    "maxNumSequence": _whole(1),
    "continuousBatching": boolean,
    "sequenceBatching": boolean,
    "asyncCommunication": boolean,
    "useVenv": boolean,
}


def check_torchserve_keys(doc: dict) -> None:
    """Refuse a top-level key of model-config.yaml that TorchServe would silently ignore: unknown (with the
    closest valid key) or of a type TorchServe does not take. `handler:` is segserve's (ServingConfig)."""
    check_keys(doc, [*TORCHSERVE_MODEL_KEYS, "handler"], what="a TorchServe 0.12 model setting")
    for key, check in TORCHSERVE_MODEL_KEYS.items():
        if key in doc:
            check(doc[key], key)


# -- weights ------------------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict from .safetensors or .pt/.pth, unwrapped ({"state_dict": ...}) and without
    DataParallel's `module.` prefixes."""
    try:
        state: Any = load_state_dict(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable or refused file is a build error, said plainly
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Unpickl" in type(exc).__name__:
            raise BuildError(f"cannot read weights {path}: it holds pickled Python objects, not just tensors, and "
                             "segserve never unpickles code. Save a state_dict instead: "
                             "torch.save(model.state_dict(), 'weights.pt') (or safetensors). "
                             f"(torch said: {first})") from None
        raise BuildError(f"cannot read weights {path}: {first}") from None
    if isinstance(state, dict):
        for key in WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BuildError(f"{path} is not a state_dict (a dict of parameter names to tensors); save "
                         "model.state_dict(), optionally wrapped as {'state_dict': ...} or {'model': ...}")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def check_fit(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise BuildError listing missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"weights do not fit {what}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise BuildError("\n".join(lines))


def check_output(model: torch.nn.Module, config: ServingConfig) -> None:
    """One forward pass of the adapted model (families.adapt, as the worker runs it) on a zero image:
    raise BuildError unless it gives (N, channels, H, W) logits, the channels the head needs for the classes."""
    channels = output_channels(model, config.input_shape)
    if channels != config.out_channels:
        raise BuildError(f"the model outputs {channels} channel(s) but its {config.head} head with "
                         f"{config.num_classes} classes ({', '.join(config.class_names)}) needs "
                         f"{config.out_channels}")


def output_channels(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """The channels of the adapted model's (N, C, H, W) logits (a 3-D model's (N, C, D, H, W)) on a zero input of
    `shape` (ServingConfig.input_shape); BuildError if it cannot run."""
    try:
        with torch.inference_mode():
            output = model.eval()(torch.zeros(1, *shape))
    except Exception as exc:  # noqa: BLE001 - a model that cannot run is a build error, said plainly
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise BuildError(f"the model's forward pass failed on a {(1, *shape)} input: {first}") from None
    if not isinstance(output, torch.Tensor) or output.dim() != len(shape) + 1:
        shown = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        expected = "(N, channels, D, H, W)" if len(shape) == 4 else "(N, channels, H, W)"
        raise BuildError(f"the model outputs {shown}: expected {expected} logits")
    return int(output.shape[1])


def check_model(config: ServingConfig, weights: Path) -> None:
    """Strict load plus one forward pass of a state_dict file; raise BuildError if it does not fit."""
    check_state(config, read_state_dict(weights))


def check_state(config: ServingConfig, state: dict[str, torch.Tensor]) -> None:
    """Build the configured architecture, load `state` strictly and run the adapted model once."""
    model = build_model(config.arch, config.out_channels, **config.arch_params)
    check_fit(model, state, f"architecture {config.arch!r} with {config.out_channels} output channels "
                            f"({config.head} head, {config.num_classes} classes)")
    model.load_state_dict(state, strict=True)
    check_output(families.adapt(config.arch, model), config)


def check_model_file(config: ServingConfig, weights: Path) -> None:
    """Load a weights file that is the model itself (TorchScript) as the worker does, plus one forward pass."""
    family = families.family_of(config.arch)
    try:
        model = families.load_model(config, weights, "cpu")
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BuildError(f"cannot load {family.name} file {weights}: {first}") from None
    check_output(model, config)


# -- the head: output channels vs classes -----------------------------------------------------------------
def fitting_model(arch: str, arch_params: dict, state: dict[str, torch.Tensor],
                  candidates: list[int]) -> torch.nn.Module | None:
    """The model built for the first candidate output-channel count that the state_dict fits exactly, with
    the state loaded and its family's adapter on; None if it fits none."""
    for channels in dict.fromkeys(c for c in candidates if c > 0):
        model = build_model(arch, channels, **arch_params)
        try:
            check_fit(model, state, arch)
        except BuildError:
            continue
        model.load_state_dict(state, strict=True)
        return families.adapt(arch, model)
    return None


def choose_head(names: list, requested: str | None, default: str | None, channels: int) -> tuple[str, list]:
    try:
        return heads.detect(names, channels, requested, default)
    except heads.HeadError as exc:
        raise BuildError(str(exc)) from None


# -- classes and config --------------------------------------------------------------------------
def read_class_list(value: str) -> list:
    """--classes: a .json/.yaml/.txt file, or comma-separated names."""
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        if path.suffix in (".json", ".yaml", ".yml"):
            doc = yaml.safe_load(text)  # YAML reads JSON too
            doc = doc.get("classes") if isinstance(doc, dict) else doc
            if not isinstance(doc, list):
                raise BuildError(f"{path}: expected a list of class names or {{name, color}} entries")
            return doc
        return [line.strip() for line in text.splitlines() if line.strip()]
    if value.endswith((".json", ".yaml", ".yml", ".txt")):
        raise BuildError(f"classes file not found: {value}")
    return [name.strip() for name in value.split(",") if name.strip()]


# --profile: TorchServe's batching and the tiled windows per pass for the device the archive will run on. cpu is
# model-config.yaml as it is (tuned with make bench on 2 cores: docs/performance.md); gpu gathers larger batches
# (the settings bench/gpu_check.sh measures, docs/performance.md, GPU), since a GPU's forward pass costs little
# more for 32 images than for 4 while a CPU's grows with every image.
PROFILES = {"cpu": {}, "gpu": {"batchSize": 32, "maxBatchDelay": 10, "tiling": {"batch": 16}}}


def make_config(base: Path, **overrides: Any) -> dict:
    """The archive's model-config.yaml: the base file with these `handler:` overrides applied."""
    if not base.is_file():
        raise BuildError(f"model config not found: {base}")
    doc = yaml.safe_load(base.read_text()) or {}
    try:
        check_torchserve_keys(doc)
    except ConfigError as exc:
        raise BuildError(f"{base}: {exc}") from None
    section = copy.deepcopy(doc.get("handler") or {})
    model = section.setdefault("model", {})
    inp = section.setdefault("input", {})
    for key in ("name", "version", "arch", "arch_params", "weights", "head", "requires"):
        if overrides.get(key) is not None:
            model[key] = overrides[key]
    if overrides.get("classes") is not None:
        section["classes"] = overrides["classes"]
    for key in ("size", "mean", "std"):
        if overrides.get(key) is not None:
            inp[key] = overrides[key]
    profile = dict(PROFILES[overrides.get("profile") or "cpu"])
    tiling = {**profile.pop("tiling", {}), **(overrides.get("tiling") or {})}
    if tiling:
        section["tiling"] = {**(section.get("tiling") or {}), **tiling}
    doc.update(profile)
    doc["handler"] = section
    return doc


# -- what the build takes -------------------------------------------------------------------------
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def plain_name(value: str, flag: str) -> str:
    """A model or archive name: a file name in the export path and a URL segment, never a path."""
    if not PLAIN_NAME.fullmatch(value or "") or ".." in value:
        raise BuildError(f"{flag} must be a plain name (letters, digits, '.', '_', '-'; no '/', no '..'), "
                         f"got {value!r}")
    return value


def model_module_name(model_file: Path, handler: Path) -> str:
    """The module name a --model-file gets in the worker (its file name): refused when it would shadow a
    module that exists there (stdlib, installed, the archive's own), or that module would shadow it."""
    module = model_file.stem
    if model_file.suffix != ".py" or not module.isidentifier():
        raise BuildError(f"--model-file must be a .py file named like a Python module (e.g. my_model.py), "
                         f"got {model_file.name}")
    own = {model_file.parent.resolve(), Path.cwd().resolve()}
    search = [entry for entry in sys.path if entry not in ("", ".") and Path(entry).resolve() not in own]
    where = ("the standard library" if module in sys.stdlib_module_names or module in sys.builtin_module_names
             else "the archive's own files" if module in ("segserve", handler.stem)
             else "an installed package" if importlib.machinery.PathFinder.find_spec(module, search) else None)
    if where:
        raise BuildError(f"--model-file {model_file.name}: {where} has a module named {module!r}, which the "
                         f"worker would import instead of your file (or your file instead of it): rename it, "
                         f"e.g. {module}_model.py")
    return module


def code_refusal(family: families.Family, weights: Path, model_file: Path | None) -> str:
    what = {"custom": f"--model-file {model_file or '(a custom model)'} is Python code",
            "torchscript": f"{weights} is a TorchScript program",
            "export": f"{weights} is a torch.export program, and torch.export.load can run code from such a file "
                      "(it unpickles parts of it and evaluates its shape expressions)"}.get(family.name,
                                                                                    f"{weights} is code")
    return (f"{what}. An archive built from it runs that code when it is built and in every worker that loads it, "
            f"with the worker's rights. If you trust the file, say so with --trust-code; a plain state_dict "
            f"(--arch ... --weights weights.pt) needs no trust.")


def parse_arch_params(items: list[str] | None) -> dict | None:
    """--arch-param KEY=VALUE, repeated; VALUE read as YAML ([16, 32], 3, true, resnet34)."""
    if not items:
        return None
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise BuildError(f"--arch-param takes KEY=VALUE (e.g. encoder_name=resnet34), got {item!r}")
        if key in params:
            raise BuildError(f"--arch-param {key} is given twice")
        try:
            params[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise BuildError(f"--arch-param {key}: {value!r} is not a YAML value (a list is [16, 32])") from None
    return params


# -- the archive ---------------------------------------------------------------------------------
def build(name: str, config_path: Path, weights: Path, export_path: Path, version: str | None = None,
          handler: Path | None = None, *, arch: str | None = None, arch_params: dict | None = None,
          model_file: Path | None = None, model_class: str | None = None, model_args: dict | None = None,
          classes: list | None = None, input_size: list[int] | None = None, mean: list[float] | None = None,
          std: list[float] | None = None, archive_name: str | None = None, head: str | None = None,
          trust_code: bool = False, profile: str = "cpu") -> Path:
    """Check the model, then write export_path/<archive_name or name>.mar."""
    if profile not in PROFILES:
        raise BuildError(f"--profile must be one of {', '.join(PROFILES)}, not {profile!r}")
    plain_name(name, "--name")
    if archive_name is not None:
        plain_name(archive_name, "--archive-name")
    weights = Path(weights)
    if not weights.exists():
        raise BuildError(f"weights not found: {weights}" +
                         (" (run `make train` to create the default weights)" if arch is None else ""))
    handler = handler or REPO / "handler" / "segmenter_handler.py"
    if not handler.is_file():
        raise BuildError(f"handler not found: {handler}")
    module = None
    if model_file is not None:  # the custom family's flags
        model_file = Path(model_file)
        if not model_file.is_file():
            raise BuildError(f"model file not found: {model_file}")
        if not model_class:
            raise BuildError("--model-file needs --model-class, the nn.Module subclass to build")
        if arch not in (None, "custom"):
            raise BuildError(f"--model-file is the custom family: drop --arch {arch}")
        arch = "custom"
        module = model_module_name(model_file, handler)
        arch_params = {"module": module, "class": model_class, "kwargs": {**(model_args or {}), **(arch_params or {})}}
    elif arch is None and (detected := families.detect(weights)) is not None:
        arch = detected.archs[0]
    base = ServingConfig.from_yaml(config_path)
    family = families.family_of(arch or base.arch)
    if family.runs_code and not trust_code:  # before anything of the file is read or run
        raise BuildError(code_refusal(family, weights, model_file))
    defaults = family.build_defaults
    if weights.is_dir() and defaults.read_weights is None:
        raise BuildError(f"{weights} is a folder: --weights takes a file for {family.name} models (a Hugging Face "
                         f"save_pretrained folder needs its {families.HF_CONFIG})")
    state, suggested = None, Suggested()
    try:
        if defaults.read_weights is not None:
            if not weights.is_dir():
                raise BuildError(f"{family.name} models are read from their save_pretrained folder "
                                 f"(config.json + model.safetensors): --weights FOLDER, got the file {weights}")
            state, suggested = defaults.read_weights(weights, dict(arch_params or {}))
            arch_params = suggested.arch_params
        elif family.state_dict:
            state = read_state_dict(weights)
        else:
            if arch_params:
                raise BuildError(f"{family.name} files take no --arch-param: the file is the whole model")
            arch_params = {}
            if defaults.inspect_file is not None:
                suggested = defaults.inspect_file(weights)
        requires = families.requirements(family)
    except (ValueError, MissingDependencyError) as exc:
        raise BuildError(str(exc)) from None
    except BuildError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable model file is a build error, said plainly
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise BuildError(f"cannot read {family.name} weights {weights}: {first}") from None
    # A file that is the model (an exported program) may take one input size only.
    if not family.state_dict and suggested.input_size and input_size and list(input_size) != list(suggested.input_size):
        raise BuildError(f"the {family.name} file takes {suggested.input_size[0]}x{suggested.input_size[1]} "
                         f"inputs: --input-size {input_size[0]}x{input_size[1]} cannot be served by it")
    tiling = None
    if arch is not None:  # chosen at build time: the family's defaults, unless told otherwise
        classes = classes if classes is not None else suggested.classes
        if defaults.needs_classes and arch != base.arch and classes is None:
            raise BuildError(f"--classes is needed with --arch {arch}: the default classes belong to the default "
                             "model (give names, e.g. --classes background,road,car, or a .json/.txt file)")
        input_size = input_size or suggested.input_size or _listed(defaults.input_size)
        mean = mean or suggested.mean or _listed(defaults.mean)
        std = std or suggested.std or _listed(defaults.std)
        if defaults.whole_image:
            tiling = {"auto_above_pixels": base.limits.max_pixels}
        if defaults.params_from_state is not None and arch_params is None:
            arch_params = defaults.params_from_state(state)
        if arch_params is None and arch != base.arch:
            arch_params = {}  # never the base config's: those are the default model's
    arch = arch or base.arch
    if arch_params is None:
        arch_params = dict(base.arch_params)
    size = input_size or base.spatial_size
    if (arch_params.get("spatial_dims", 2) == 3) != (len(size) == 3):
        raise BuildError(f"spatial_dims={arch_params.get('spatial_dims', 2)} and the input size "
                         f"{'x'.join(map(str, size))} disagree: a 3-D model (--arch-param spatial_dims=3) takes its "
                         "sliding window as --input-size DEPTHxHEIGHTxWIDTH (e.g. 32x64x64), a 2-D one HEIGHTxWIDTH")
    requested = head or _base_head(config_path)
    names = classes if classes is not None else [c.to_dict() for c in base.classes]
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segserve-mar-") as tmp:
        stage = Path(tmp) / "extra"
        # --extra-files copies a folder's contents into the archive root, subfolders intact.
        shutil.copytree(PACKAGE_DIR, stage / "segserve",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", *NOT_SHIPPED))
        if model_file is not None:
            shutil.copy2(model_file, stage / model_file.name)
        with _importable(stage, module):
            # The head follows from the model's output channels and the class list (or --head).
            try:
                if state is not None:
                    preferred = [heads.get(requested).channels(len(names)), len(names)] if requested else []
                    model = fitting_model(arch, arch_params, state, [*preferred, len(names), 1, len(names) - 1])
                    if model is None:  # fits none: say why for the class list as given (a softmax head's channels)
                        check_fit(build_model(arch, len(names), **arch_params), state,
                                  f"architecture {arch!r} with {len(names)} output channels for the classes given")
                else:
                    model = families.adapt(arch, family.load(weights, torch.device("cpu")))
            except (ValueError, TypeError, ImportError) as exc:  # the family's or library's word on the params
                raise BuildError(f"cannot build {arch} with arch_params {_shown(arch_params)}: {exc}"
                                 f"{_extra_hint(family, exc)}") from None
            # The channels the forward pass gives, whatever the build was told (a model file may fix its own).
            channels = output_channels(model, input_shape(size, arch_params))
            chosen, names = choose_head(names, requested, defaults.head, channels)
            doc = make_config(config_path, name=name, version=version, arch=arch, arch_params=arch_params,
                              weights=family.weights_file, requires=requires or None, classes=names, size=input_size,
                              mean=mean, std=std, tiling=tiling, head=chosen, profile=profile)
            try:
                config = ServingConfig.from_dict(doc["handler"])
            except ConfigError as exc:
                raise BuildError(str(exc)) from None
            if state is None:  # the weights file is the model: checked as the worker loads it, shipped as given
                check_model_file(config, weights)
                shutil.copy2(weights, stage / config.weights)
            else:
                try:
                    check_state(config, state)
                except (ValueError, TypeError, ImportError) as exc:  # the family's or library's word on the params
                    raise BuildError(f"cannot build {config.arch} with arch_params {_shown(config.arch_params)}: "
                                     f"{exc}{_extra_hint(family, exc)}") from None
                # Clones: safetensors refuses tensors that share memory (tied weights).
                save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(stage / config.weights))
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(doc, sort_keys=False))
        cmd = [*ARCHIVER, "--model-name", name,
               "--version", config.version, "--handler", str(handler), "--extra-files", str(stage),
               "--config-file", str(config_file), "--export-path", str(Path(tmp) / "out"), "--force"]
        (Path(tmp) / "out").mkdir()
        # The archiver stages its files in $TMPDIR/<model name>: a temp dir of this build's own, so two builds
        # of the same name at once (tests and the bench side by side) do not delete each other's files.
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        if result.returncode != 0:
            raise BuildError(f"torch-model-archiver failed:\n{result.stdout}{result.stderr}")
        target = export_path / f"{archive_name or name}.mar"
        shutil.move(str(Path(tmp) / "out" / f"{name}.mar"), target)
    return target


def _base_head(config_path: Path) -> str | None:
    """The head the base model-config.yaml sets itself (handler.model.head), if it does."""
    doc = yaml.safe_load(Path(config_path).read_text()) or {}
    return ((doc.get("handler") or {}).get("model") or {}).get("head")


def _extra_hint(family: families.Family, exc: Exception) -> str:
    """For an ImportError of a family's library: the extra that installs it."""
    if isinstance(exc, ImportError) and family.extra and not isinstance(exc, MissingDependencyError):
        return f" (segserve's {family.extra!r} extra installs what its models import: " \
               f"{families.install_hint(family.extra)})"
    return ""


def _shown(params: dict) -> str:
    """arch_params for a message: a Hugging Face config (a long dict) by its model type only."""
    config = params.get("config")
    if isinstance(config, dict):
        params = {**params, "config": f"<{config.get('model_type')} config.json>"}
    return str(params)


def _listed(values: tuple | None) -> list | None:
    """A family default as YAML writes it (a list), or None."""
    return None if values is None else list(values)


class _importable:
    """Make the staged user module importable for the build-time check, and forget it afterwards."""

    def __init__(self, folder: Path, module: str | None):
        self.folder, self.module = str(folder), module

    def __enter__(self):
        if self.module:
            sys.path.insert(0, self.folder)
            sys.modules.pop(self.module, None)
            importlib.invalidate_caches()

    def __exit__(self, *exc):
        if self.module:
            sys.path.remove(self.folder)
            sys.modules.pop(self.module, None)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.485,0.456,0.406, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers (R,G,B), got {text!r}")
    return values


def _size(text: str) -> list[int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH, e.g. 520 or 480x640, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) not in (2, 3) or min(values) <= 0:  # 3: a 3-D model's DEPTHxHEIGHTxWIDTH window
        raise argparse.ArgumentTypeError(f"expected SIZE, HEIGHTxWIDTH or (3-D models) DEPTHxHEIGHTxWIDTH, "
                                         f"got {text!r}")
    return values


# torch-model-archiver's flags that have no equivalent here, and what to use instead (the ones that do are
# aliases of ours: --model-name, --serialized-file, --config-file; --model-file, --version, --export-path and
# -f/--force are the same names).
ARCHIVER_ONLY_FLAGS = {
    "--handler": "segserve's archive always has its own handler (handler/segmenter_handler.py); your model goes "
                 "in with --arch/--weights, or --model-file/--model-class for your own architecture",
    "--extra-files": "the archive takes segserve's worker package and the weights itself; your architecture's "
                     "code goes in with --model-file",
    "--requirements-file": "what a model family needs is recorded in the archive (handler.model.requires) and "
                           "installed with segserve's extras (pip install 'segserve[smp]', a container's "
                           "--build-arg SEGSERVE_EXTRAS=smp,hf,monai)",
    "--archive-format": "the archive is always a .mar (the archiver's 'default' format); --archive-name sets its "
                        "file name",
    "--runtime": "the archive always runs in TorchServe's python runtime",
}


class _ArchiverOnly(argparse.Action):
    """A torch-model-archiver flag with no equivalent: refused, naming what to use instead."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is torch-model-archiver's, with no equivalent here: "
                     f"{ARCHIVER_ONLY_FLAGS[option_string]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_mar.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--name", "--model-name", default="segmenter",
                        help="model name: the URL is /predictions/NAME")
    parser.add_argument("--version", default=None, help="model version (default: the config's, 1.0)")
    parser.add_argument("--archive-name", default=None, help="file name of the .mar without suffix (default: NAME)")
    parser.add_argument("--arch", default=None,
                        help=f"architecture (default: the config's, unet; a Hugging Face folder, an exported program "
                             f"or a TorchScript file is detected): one of {', '.join(families.architectures())} "
                             f"(--list-archs lists every one; custom: give --model-file)")
    parser.add_argument("--arch-param", action="append", default=None, metavar="KEY=VALUE",
                        help="a keyword argument of the architecture, VALUE read as YAML, repeatable: "
                             "--arch-param encoder_name=resnet34 --arch-param channels=[16,32,64]")
    parser.add_argument("--model-file", type=Path, default=None,
                        help="your own architecture: a .py file (code: needs --trust-code)")
    parser.add_argument("--model-class", default=None, help="the nn.Module class in --model-file")
    parser.add_argument("--model-args", type=json.loads, default=None,
                        help='JSON keyword arguments for --model-class, e.g. \'{"width": 32}\'')
    parser.add_argument("--trust-code", action="store_true",
                        help="take a model that is code (--model-file, TorchScript, a torch.export program): the "
                             "archive runs it at build and in every worker")
    parser.add_argument("--weights", "--serialized-file", type=Path, default=None,
                        help="state_dict (.pt/.pth, plain, {'state_dict': ...}/{'model': ...}, DataParallel "
                             "'module.' prefixes) or .safetensors, a Hugging Face save_pretrained folder, a "
                             "torch.export .pt2 or a TorchScript file (default: model/'s)")
    parser.add_argument("--classes", type=read_class_list, default=None,
                        help="class names, comma-separated, or a .json/.yaml/.txt file (names or {name, color})")
    parser.add_argument("--head", choices=heads.NAMES, default=None,
                        help="how output channels become masks: softmax (a channel per class), binary (one sigmoid "
                             "channel: --classes lesion or background,lesion) or multilabel (a sigmoid channel per "
                             "class after the background; classes may overlap). Default: detected from the model's "
                             "output channels and the class list")
    parser.add_argument("--input-size", type=_size, default=None,
                        help="model input, SIZE or HEIGHTxWIDTH (3-D models: DEPTHxHEIGHTxWIDTH)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                        help="batching for the device: cpu (model-config.yaml's batchSize 4, maxBatchDelay 5) or "
                             "gpu (batchSize 32, maxBatchDelay 10, 16 tiled windows per pass)")
    parser.add_argument("--mean", type=_floats, default=None, help="normalization mean, R,G,B in 0..1")
    parser.add_argument("--std", type=_floats, default=None, help="normalization std, R,G,B")
    parser.add_argument("--config", "--config-file", type=Path, default=REPO / "model" / "model-config.yaml",
                        help="base model-config.yaml (workers, batching, limits)")
    parser.add_argument("--export-path", type=Path, default=REPO / "model-store")
    parser.add_argument("-f", "--force", action="store_true",
                        help="overwrite an archive of the same file name in the export path (refused without)")
    for flag in ARCHIVER_ONLY_FLAGS:
        parser.add_argument(flag, action=_ArchiverOnly)
    parser.add_argument("--list-archs", action="store_true", help="list every architecture name and exit")
    args = parser.parse_args(argv)
    if args.list_archs:
        for family, names in families.all_architectures().items():
            print(f"{family}: {', '.join(names) if isinstance(names, list) else names}")
        return 0
    try:
        archive = plain_name(args.archive_name, "--archive-name") if args.archive_name else plain_name(args.name,
                                                                                                        "--name")
        target = args.export_path / f"{archive}.mar"
        if target.exists() and not args.force:  # before any work: a build can take minutes
            raise BuildError(f"{target} exists: pass -f/--force to overwrite it, or --archive-name / "
                             "--export-path to build another file")
        weights = args.weights
        if weights is None:
            if args.arch or args.model_file:
                raise BuildError("--weights is needed with --arch or --model-file")
            weights = args.config.parent / ServingConfig.from_yaml(args.config).weights
        mar = build(args.name, args.config, weights, args.export_path, args.version, arch=args.arch,
                    arch_params=parse_arch_params(args.arch_param), model_file=args.model_file,
                    model_class=args.model_class, model_args=args.model_args, classes=args.classes,
                    input_size=args.input_size, mean=args.mean, std=args.std, archive_name=args.archive_name,
                    head=args.head, trust_code=args.trust_code, profile=args.profile)
    except (BuildError, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"build_mar.sh: error: {exc}", file=sys.stderr)
        return 2
    config = ServingConfig.from_dict(yaml.safe_load(zipfile.ZipFile(mar).read("model-config.yaml"))["handler"])
    print(f"built {mar} ({mar.stat().st_size / 1e6:.1f} MB): {config.name} {config.version}, {config.arch} "
          f"({families.family_of(config.arch).name}), {config.head} head, {config.num_classes} classes "
          f"({', '.join(config.class_names)}), input {'x'.join(map(str, config.spatial_size))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
