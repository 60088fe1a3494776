"""Building blocks for tests that drive segmenter_handler.py in-process, as a TorchServe worker calls it
(segserve.tools.inprocess): model directories for stand-in models, and one-request helpers."""

from __future__ import annotations

import copy
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from segserve.tools.inprocess import Reply, Request, handle, load_handler
from support import MODEL_CONFIG


class ChannelArgmax(nn.Module):
    """A stand-in 'model' whose answer is known: class = the brightest colour channel."""

    def forward(self, x):
        return x.clone()


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def model_yaml(**handler: Any) -> dict[str, Any]:
    """model/model-config.yaml with these `handler:` settings merged in (e.g. limits={"max_pixels": 10})."""
    return merged(yaml.safe_load(MODEL_CONFIG.read_text()), {"handler": handler})


def model_dir(folder: Path, model: nn.Module, head: str = "softmax", **handler: Any) -> Path:
    """A model directory as TorchServe unpacks an archive: model-config.yaml (the default model's, with
    `handler` settings merged in) and `model` saved as TorchScript, the weights it names."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = model_yaml(**handler)
    doc["handler"]["model"] = {**doc["handler"]["model"], "arch": "torchscript", "weights": "model.pt",
                               "arch_params": {}, "head": head}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks TorchScript deprecated; families loads it
        torch.jit.save(torch.jit.script(model.eval()), str(folder / "model.pt"))
    (folder / "model-config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


def stand_in_handler(folder: Path, model: nn.Module | None = None, metrics: Any = None, head: str = "softmax",
                     **handler: Any):
    """segmenter_handler.py initialized on a stand-in model (default ChannelArgmax); `metrics` as load_handler's."""
    folder = model_dir(folder, model or ChannelArgmax(), head, **handler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return load_handler(folder, metrics=metrics)


def ask(handler, inputs: dict[str, Any], headers: dict[str, Any] | None = None) -> Reply:
    """One request alone in its batch."""
    (reply,) = handle(handler, [Request(inputs, headers or {})])
    return reply


def archive_doc(mar: Path) -> dict[str, Any]:
    """An archive's model-config.yaml, as the build wrote it."""
    with zipfile.ZipFile(mar) as archive:
        return yaml.safe_load(archive.read("model-config.yaml"))


def unpack(mar: Path, folder: Path) -> Path:
    """An archive unzipped into `folder`, as TorchServe unpacks it for a worker."""
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(folder)
    return folder


def unpacked_handler(mar: Path, folder: Path):
    """segmenter_handler.py initialized in this process on the archive unpacked into `folder`."""
    return load_handler(unpack(mar, folder))
