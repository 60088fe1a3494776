"""The model families beyond torchvision: segmentation_models_pytorch, Hugging Face transformers folders, MONAI
and torch.export programs (small random models). Each builds strictly, offline, records what it needs, and is
served by one real TorchServe with the same masks as the handler in this process; code is taken only on trust."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image
from support import MODEL_CONFIG, REPO, encode_image, random_image, torchserve
from support.handlers import archive_doc, unpacked_handler
from torch import nn

from segserve import families
from segserve.config import ServingConfig
from segserve.families import MissingDependencyError, build_model
from segserve.tools.build import BuildError, build, main, parse_arch_params
from segserve.tools.inprocess import Request, handle
from segserve.tools.server import free_ports

CLASSES = ["background", "cell", "nucleus"]
SIZE = [64, 64]
# Small sizes of each library's own architectures, so the whole module runs in minutes on 2 cores.
SMP_PARAMS = {"encoder_name": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
MONAI_PARAMS = {"channels": [8, 16, 32], "strides": [2, 2]}
SWIN_PARAMS = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
HAS_SCIPY = importlib.util.find_spec("scipy") is not None  # the hf extra's: Mask2Former builds its loss with it
HAS_EINOPS = importlib.util.find_spec("einops") is not None  # the monai extra's: SwinUNETR needs it


def segformer_folder(folder, size=64, with_processor=True):
    """A SegFormer as save_pretrained writes it (a tiny config), with its image processor's settings."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 1],
                             decoder_hidden_size=32, id2label=dict(enumerate(CLASSES)),
                             label2id={name: i for i, name in enumerate(CLASSES)})
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    if with_processor:
        SegformerImageProcessor(size={"height": size, "width": size}, image_mean=[0.5, 0.4, 0.3],
                                image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


def mask2former_folder(folder):
    from transformers import AutoModelForUniversalSegmentation, Mask2FormerConfig

    backbone = {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                "out_features": ["stage1", "stage2", "stage3", "stage4"], "image_size": 64, "window_size": 4}
    config = Mask2FormerConfig(num_labels=3, hidden_dim=32, encoder_feedforward_dim=64, encoder_layers=1,
                               decoder_layers=2, num_queries=8, dim_feedforward=64, num_attention_heads=2,
                               mask_feature_size=32, feature_size=32, backbone_config=backbone,
                               id2label=dict(enumerate(CLASSES)))
    torch.manual_seed(0)
    AutoModelForUniversalSegmentation.from_config(config).save_pretrained(folder)
    return folder


def oneformer_folder(folder):
    """A OneFormer and its processor as save_pretrained writes them; the tokenizer a CLIP BPE over single letters
    (what a real one does with words, in a vocabulary written here: nothing is downloaded)."""
    import string

    from transformers import (
        CLIPTokenizer,
        OneFormerConfig,
        OneFormerForUniversalSegmentation,
        OneFormerImageProcessor,
        OneFormerProcessor,
    )

    folder.mkdir(parents=True)
    letters = list(string.ascii_lowercase)
    vocab = {name: index for index, name in enumerate(["<|startoftext|>", "<|endoftext|>", *letters,
                                                       *(f"{c}</w>" for c in letters)])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    backbone = {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                "out_features": ["stage1", "stage2", "stage3", "stage4"], "image_size": 64, "window_size": 4}
    config = OneFormerConfig(num_labels=3, id2label=dict(enumerate(CLASSES)), hidden_dim=32, encoder_feedforward_dim=64,
                             encoder_layers=1, decoder_layers=2, num_queries=8, dim_feedforward=64,
                             num_attention_heads=2, mask_dim=32, conv_dim=32, text_encoder_width=32,
                             text_encoder_num_layers=1, text_encoder_vocab_size=len(vocab), backbone_config=backbone)
    torch.manual_seed(0)
    model = OneFormerForUniversalSegmentation(config).eval()
    model.save_pretrained(folder)
    processor = OneFormerProcessor(image_processor=OneFormerImageProcessor(), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return model, processor


class Tiny(nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, channels, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x).relu())


def exported_program(path, dynamic=True):
    torch.manual_seed(0)
    model = Tiny().eval()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3, *SIZE),), dynamic_shapes=shapes), str(path))
    return model


def state_file(path, arch, **params):
    torch.manual_seed(0)
    torch.save(build_model(arch, len(CLASSES), **params).state_dict(), path)
    return path


def mask_of(reply_body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(reply_body)))


# -- smp ------------------------------------------------------------------------------------------------
def test_smp_architectures_come_from_the_library_and_build_strictly(tmp_path, capsys):
    import segmentation_models_pytorch as smp

    names = families.family_of("smp:Unet").arch_names()
    assert names == [f"smp:{cls.__name__}" for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()]
    for arch in ("smp:Unet", "smp:FPN", "smp:DeepLabV3Plus"):
        params = {"encoder_name": "tu-resnet10t", "encoder_depth": 3 if arch == "smp:Unet" else 5}
        if arch == "smp:Unet":
            params["decoder_channels"] = [16, 8, 8]
        weights = state_file(tmp_path / f"{arch[4:]}.pt", arch, **params)
        flags = [flag for key, value in params.items() for flag in ("--arch-param", f"{key}={json.dumps(value)}")]
        code = main(["--name", arch[4:].lower(), "--arch", arch, *flags, "--weights", str(weights), "--classes",
                     ",".join(CLASSES), "--input-size", "64", "--export-path", str(tmp_path / "store")])
        assert code == 0, capsys.readouterr().err
        doc = archive_doc(tmp_path / "store" / f"{arch[4:].lower()}.mar")["handler"]
        assert doc["model"]["arch"] == arch and doc["model"]["arch_params"] == params
        assert doc["model"]["requires"] == {name: importlib.metadata.version(name) for name in
                                            ("segmentation-models-pytorch", "timm", "huggingface-hub")}
        assert doc["input"]["mean"] == [0.485, 0.456, 0.406]  # the ImageNet statistics of smp's encoders
    # Weights of another encoder depth: the keys are listed, nothing is written.
    code = main(["--name", "wrong", "--arch", "smp:Unet", "--arch-param", "encoder_name=tu-resnet10t",
                 "--weights", str(tmp_path / "Unet.pt"), "--classes", ",".join(CLASSES),
                 "--export-path", str(tmp_path / "store")])
    assert code == 2 and "missing keys" in (err := capsys.readouterr().err) and "shape mismatches" in err
    assert not (tmp_path / "store" / "wrong.mar").exists()


@pytest.mark.parametrize("param, message", [
    ("encoder_weights=imagenet", "never downloads"),
    ("activation=sigmoid", "takes the model's logits"),
    ("classes=4", "follow --classes"),
])
def test_smp_settings_that_would_download_or_change_the_output_are_refused(tmp_path, capsys, param, message):
    weights = state_file(tmp_path / "u.pt", "smp:Unet", **SMP_PARAMS)
    code = main(["--arch", "smp:Unet", "--arch-param", param, "--weights", str(weights), "--classes", "a,b,c",
                 "--export-path", str(tmp_path / "store")])
    assert code == 2 and message in capsys.readouterr().err


def test_an_unknown_smp_architecture_lists_the_libraries_names(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    code = main(["--arch", "smp:Unet9000", "--weights", str(tmp_path / "w.pt"), "--classes", "a,b",
                 "--export-path", str(tmp_path / "store")])
    assert code == 2 and "choose one of: smp:Unet, smp:UnetPlusPlus" in capsys.readouterr().err


def test_arch_params_are_yaml_values():
    assert parse_arch_params(["channels=[16, 32]", "strides=[2,2]", "dropout=0.1", "bias=true", "name=resnet34",
                              "act="]) == {"channels": [16, 32], "strides": [2, 2], "dropout": 0.1, "bias": True,
                                           "name": "resnet34", "act": None}
    for bad in (["novalue"], ["a=1", "a=2"], ["x=[1,"], ["=3"]):
        with pytest.raises(BuildError):
            parse_arch_params(bad)


# -- Hugging Face ---------------------------------------------------------------------------------------
def test_a_save_pretrained_folder_is_detected_with_its_classes_and_preprocessing(tmp_path):
    folder = segformer_folder(tmp_path / "segformer")
    mar = build("segformer", MODEL_CONFIG, folder, tmp_path / "store")
    doc = archive_doc(mar)["handler"]
    assert doc["model"]["arch"] == "hf" and doc["classes"] == CLASSES
    assert doc["input"] == {"size": [64, 64], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    assert doc["model"]["arch_params"]["config"] == json.loads((folder / "config.json").read_text())
    assert set(doc["model"]["requires"]) == {"transformers", "huggingface-hub"}
    # Flags win over the folder's settings.
    mar = build("segformer2", MODEL_CONFIG, folder, tmp_path / "store", classes=["bg", "a", "b"],
                input_size=[96, 128], mean=[0.1, 0.2, 0.3], std=[1, 1, 1])
    doc = archive_doc(mar)["handler"]
    assert doc["classes"] == ["bg", "a", "b"] and doc["input"]["size"] == [96, 128]
    assert doc["input"]["mean"] == [0.1, 0.2, 0.3]
    # The archive holds the config and the weights as safetensors, and the worker builds the model from them.
    names = zipfile.ZipFile(mar).namelist()
    assert "weights.safetensors" in names and not any(name.endswith(".bin") for name in names)
    handler = unpacked_handler(mar, tmp_path / "unpacked")
    from transformers import SegformerForSemanticSegmentation

    original = SegformerForSemanticSegmentation.from_pretrained(folder).eval()
    x = torch.rand(2, 3, 96, 128)
    with torch.inference_mode():
        assert torch.allclose(handler.segmenter.model(x), original(x).logits, atol=1e-5)


def hf_semantic_model(model_type):
    """A tiny model of each of these Hugging Face semantic-segmentation types, random weights."""
    import transformers as hf

    labels = dict(enumerate(CLASSES))
    vit = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
           "image_size": 64, "patch_size": 16, "id2label": labels}
    torch.manual_seed(0)
    if model_type == "upernet":
        backbone = hf.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                     out_features=["stage1", "stage2", "stage3", "stage4"])
        return hf.UperNetForSemanticSegmentation(hf.UperNetConfig(
            backbone_config=backbone, hidden_size=16, auxiliary_in_channels=24, auxiliary_channels=16, id2label=labels))
    if model_type == "dpt":
        return hf.DPTForSemanticSegmentation(hf.DPTConfig(**vit, neck_hidden_sizes=[8, 16, 24, 32],
                                                          fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3]))
    return hf.BeitForSemanticSegmentation(hf.BeitConfig(**vit, out_indices=[0, 1, 2, 3], pool_scales=[1, 2],
                                                        auxiliary_channels=16))


@pytest.mark.parametrize("model_type", ["upernet", "dpt", "beit"])
def test_hf_semantic_segmentation_types_load_as_saved(tmp_path, model_type):
    model = hf_semantic_model(model_type).eval()
    model.save_pretrained(tmp_path / model_type)
    mar = build(model_type, MODEL_CONFIG, tmp_path / model_type, tmp_path / "store", input_size=SIZE)
    assert archive_doc(mar)["handler"]["model"]["arch_params"]["config"]["model_type"] == model_type
    handler = unpacked_handler(mar, tmp_path / "unpacked")
    x = torch.rand(2, 3, *SIZE)
    with torch.inference_mode():
        assert torch.allclose(handler.segmenter.model(x), model(x).logits, atol=1e-5)


def test_hf_weights_that_do_not_fit_their_config_are_listed(tmp_path, capsys, caplog):
    folder = segformer_folder(tmp_path / "segformer", with_processor=False)
    config = json.loads((folder / "config.json").read_text())
    config["decoder_hidden_size"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    code = main(["--weights", str(folder), "--export-path", str(tmp_path / "store")])
    assert code == 2 and "do not fit its config.json" in capsys.readouterr().err
    assert "decode_head.classifier.weight" in caplog.text and "MISMATCH" in caplog.text  # transformers' report
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_hf_remote_code_and_pickled_weights_are_refused(tmp_path, capsys):
    folder = segformer_folder(tmp_path / "segformer", with_processor=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "mine.Model"}}))
    assert main(["--weights", str(folder), "--export-path", str(tmp_path / "store")]) == 2
    assert "never runs a model's remote code" in capsys.readouterr().err
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert main(["--weights", str(folder), "--export-path", str(tmp_path / "store")]) == 2
    assert "safetensors only" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_SCIPY, reason="the hf extra's scipy is not installed (make install brings it)")
def test_mask2former_semantic_scores_are_its_image_processors(tmp_path):
    """The adapter's logits are the log of Mask2FormerImageProcessor.post_process_semantic_segmentation's
    scores: the same map, taken at the model's own mask resolution (here 384x384, which the processor keeps)."""
    from transformers import Mask2FormerImageProcessor
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    torch.manual_seed(0)
    output = Mask2FormerForUniversalSegmentationOutput(class_queries_logits=torch.randn(2, 8, 4),
                                                       masks_queries_logits=torch.randn(2, 8, 384, 384))
    logits = families.family_of("hf").logits(output)
    expected = Mask2FormerImageProcessor().post_process_semantic_segmentation(output, return_segmentation_scores=True)
    for index, answer in enumerate(expected):
        assert torch.equal(logits[index].argmax(0), answer.segmentation)
        assert torch.allclose(logits[index].exp(), answer.segmentation_scores, atol=1e-6)
    mar = build("m2f", MODEL_CONFIG, mask2former_folder(tmp_path / "m2f"), tmp_path / "store", input_size=SIZE)
    assert archive_doc(mar)["handler"]["classes"] == CLASSES


@pytest.mark.skipif(not HAS_SCIPY, reason="the hf extra's scipy is not installed (make install brings it)")
def test_a_oneformer_folder_is_served_its_semantic_task(tmp_path):
    model, processor = oneformer_folder(tmp_path / "oneformer")
    mar = build("oneformer", MODEL_CONFIG, tmp_path / "oneformer", tmp_path / "store", input_size=SIZE)
    task = processor._preprocess_text(["the task is semantic"], max_length=processor.task_seq_length)
    assert archive_doc(mar)["handler"]["model"]["arch_params"]["task_inputs"] == task[0].tolist()
    handler = unpacked_handler(mar, tmp_path / "unpacked")  # the worker has no tokenizer, only those tokens
    x = torch.rand(2, 3, *SIZE)
    with torch.inference_mode():
        output = model(pixel_values=x, task_inputs=task.expand(2, -1))
        expected = processor.image_processor.post_process_semantic_segmentation(output, target_sizes=[(16, 16)] * 2)
        served = handler.segmenter.model(x)
    assert served.shape == (2, 3, 16, 16)  # OneFormer's masks are at 1/4 of its input
    for index in range(2):
        assert torch.equal(served[index].argmax(0), expected[index])


# -- MONAI ----------------------------------------------------------------------------------------------
def test_monai_networks_take_their_own_arguments(tmp_path, capsys):
    weights = state_file(tmp_path / "unet.pt", "monai:UNet", **MONAI_PARAMS)
    code = main(["--name", "munet", "--arch", "monai:UNet", "--arch-param", "channels=[8, 16, 32]",
                 "--arch-param", "strides=[2, 2]", "--weights", str(weights), "--classes", ",".join(CLASSES),
                 "--input-size", "64", "--export-path", str(tmp_path / "store")])
    assert code == 0, capsys.readouterr().err
    doc = archive_doc(tmp_path / "store" / "munet.mar")["handler"]
    assert doc["model"]["arch_params"] == MONAI_PARAMS and list(doc["model"]["requires"]) == ["monai"]
    assert "monai:BasicUNet" in families.family_of("monai:UNet").arch_names()
    code = main(["--arch", "monai:UNet", "--arch-param", "spatial_dims=3", "--weights", str(weights),
                 "--classes", ",".join(CLASSES), "--export-path", str(tmp_path / "store")])
    assert code == 2 and "DEPTHxHEIGHTxWIDTH" in capsys.readouterr().err  # a 3-D model needs a 3-D window
    # Without --arch-param an architecture gets its own defaults, never the base config's (the default U-Net's).
    weights = state_file(tmp_path / "basic.pt", "monai:BasicUNet")
    mar = build("basic", MODEL_CONFIG, weights, tmp_path / "store", arch="monai:BasicUNet", classes=CLASSES,
                input_size=SIZE)
    assert archive_doc(mar)["handler"]["model"]["arch_params"] == {}


# -- torch.export ---------------------------------------------------------------------------------------
def test_an_exported_program_round_trips(tmp_path):
    model = exported_program(tmp_path / "tiny.pt2")
    mar = build("tiny", MODEL_CONFIG, tmp_path / "tiny.pt2", tmp_path / "store", classes=CLASSES, trust_code=True)
    doc = archive_doc(mar)["handler"]
    assert doc["model"]["arch"] == "export" and doc["model"]["weights"] == "model.pt2"
    assert doc["input"]["size"] == SIZE  # read from the program
    handler = unpacked_handler(mar, tmp_path / "unpacked")
    x = torch.rand(3, 3, *SIZE)  # another batch size than it was exported with
    with torch.inference_mode():
        assert torch.allclose(handler.segmenter.model(x), model(x), atol=1e-6)
    (reply,) = handle(handler, [Request({"body": encode_image(random_image(50, 40))}, {"Accept": "image/png"})])
    assert reply.status == 200 and mask_of(reply.body).shape == (40, 50)


def test_an_exported_program_without_a_dynamic_batch_or_of_another_size_is_refused(tmp_path):
    exported_program(tmp_path / "static.pt2", dynamic=False)
    with pytest.raises(BuildError, match=r"batch dimension is fixed at 2.*Dim\('batch'\)"):
        build("s", MODEL_CONFIG, tmp_path / "static.pt2", tmp_path / "store", classes=CLASSES, trust_code=True)
    exported_program(tmp_path / "tiny.pt2")
    with pytest.raises(BuildError, match="takes 64x64 inputs: --input-size 128x128"):
        build("s", MODEL_CONFIG, tmp_path / "tiny.pt2", tmp_path / "store", classes=CLASSES, input_size=[128, 128],
              trust_code=True)


def crafted_program(source, target, marker):
    """A .pt2 whose sample inputs are a pickle that writes `marker`: torch.export.load falls back to
    torch.load(weights_only=False) for them (torch/_export/serde/serialize.py, deserialize_torch_artifact)."""

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, buffer.getvalue() if item.filename.endswith("sample_inputs/model.pt") else data)


def test_an_exported_program_is_code_torch_export_load_runs_a_crafted_one(tmp_path):
    exported_program(tmp_path / "tiny.pt2")
    marker = tmp_path / "ran"
    crafted_program(tmp_path / "tiny.pt2", tmp_path / "crafted.pt2", marker)
    # Without --trust-code the build refuses before reading it: nothing runs.
    with pytest.raises(BuildError, match="torch.export program.*--trust-code"):
        build("c", MODEL_CONFIG, tmp_path / "crafted.pt2", tmp_path / "store", classes=CLASSES)
    assert not marker.exists()
    # What --trust-code means: torch.export.load itself runs the file's pickle (why the flag is needed).
    with pytest.raises(Exception):  # noqa: B017 - the payload is no tensor: torch fails after running it
        torch.export.load(str(tmp_path / "crafted.pt2"))
    assert marker.read_text() == "ran"


# -- code only on trust, plain names ------------------------------------------------------------------------
def test_code_is_taken_only_with_trust_code(tmp_path, capsys):
    scripted = tmp_path / "scripted.pt"
    torch.jit.trace(Tiny().eval(), torch.zeros(1, 3, *SIZE)).save(str(scripted))
    model_file = tmp_path / "tiny_model.py"
    model_file.write_text("import torch.nn as nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
                          "        super().__init__()\n        self.conv = nn.Conv2d(3, 3, 1)\n\n"
                          "    def forward(self, x):\n        return self.conv(x)\n")
    torch.save({"conv.weight": torch.zeros(3, 3, 1, 1), "conv.bias": torch.zeros(3)}, tmp_path / "net.pt")
    store = str(tmp_path / "store")
    for flags in (["--weights", str(scripted)], ["--arch", "torchscript", "--weights", str(scripted)],
                  ["--model-file", str(model_file), "--model-class", "Net", "--weights", str(tmp_path / "net.pt")]):
        assert main([*flags, "--classes", ",".join(CLASSES), "--export-path", store, "--force"]) == 2
        err = capsys.readouterr().err
        assert "--trust-code" in err and "runs that code when it is built and in every worker" in err
        assert main([*flags, "--classes", ",".join(CLASSES), "--export-path", store, "--trust-code", "--force"]) == 0


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/tmp/x", ".hidden", "a b"])
def test_archive_and_model_names_are_plain(tmp_path, name):
    weights = REPO / "model" / ServingConfig.from_yaml(MODEL_CONFIG).weights
    with pytest.raises(BuildError, match="must be a plain name"):
        build("segmenter", MODEL_CONFIG, weights, tmp_path / "store", archive_name=name)
    with pytest.raises(BuildError, match="must be a plain name"):
        build(name, MODEL_CONFIG, weights, tmp_path / "store")
    assert not list(tmp_path.rglob("*.mar"))


@pytest.mark.parametrize("module", ["torch", "json", "segserve", "numpy", "segmenter_handler"])
def test_a_model_file_that_would_shadow_a_module_is_refused(tmp_path, module):
    model_file = tmp_path / f"{module}.py"
    model_file.write_text("import torch.nn as nn\n\nclass Net(nn.Conv2d):\n    pass\n")
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(BuildError, match=f"a module named '{module}'.*rename it, e.g. {module}_model.py"):
        build("m", MODEL_CONFIG, tmp_path / "w.pt", tmp_path / "store", model_file=model_file, model_class="Net",
              classes=CLASSES, trust_code=True)


# -- what an archive needs, and nothing from a network -------------------------------------------------------
def test_a_worker_without_the_familys_library_names_the_extra_to_install(tmp_path):
    mar = build("munet", MODEL_CONFIG, state_file(tmp_path / "u.pt", "monai:UNet", **MONAI_PARAMS), tmp_path / "s",
                arch="monai:UNet", arch_params=MONAI_PARAMS, classes=CLASSES, input_size=SIZE)
    doc = archive_doc(mar)
    # As an environment without it sees the archive: a recorded distribution that is not installed.
    doc["handler"]["model"]["requires"]["segserve-absent-library"] = "1.0"
    with pytest.raises(MissingDependencyError, match=r"needs segserve-absent-library==1\.0, which this environment "
                                                     r"lacks: install segserve's 'monai' extra \(pip install "
                                                     r"'segserve\[monai\]'"):
        families.load_model(ServingConfig.from_dict(doc["handler"]), tmp_path / "u.pt")


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and name lookup fails, as on a machine without a network."""
    def refuse(*args, **kwargs):
        raise OSError("test: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_builds_and_loads_reach_no_network(tmp_path, no_network):
    assert all(os.environ[name] == "1" for name in families.OFFLINE_ENV)
    store = tmp_path / "store"
    archives = [
        build("smp", MODEL_CONFIG, state_file(tmp_path / "smp.pt", "smp:Unet", **SMP_PARAMS), store, arch="smp:Unet",
              arch_params=SMP_PARAMS, classes=CLASSES, input_size=SIZE),
        build("hf", MODEL_CONFIG, segformer_folder(tmp_path / "segformer"), store),
        build("monai", MODEL_CONFIG, state_file(tmp_path / "m.pt", "monai:UNet", **MONAI_PARAMS), store,
              arch="monai:UNet", arch_params=MONAI_PARAMS, classes=CLASSES, input_size=SIZE),
    ]
    for mar in archives:
        handler = unpacked_handler(mar, tmp_path / mar.stem)
        (reply,) = handle(handler, [Request({"body": encode_image(random_image(70, 50))}, {"Accept": "image/png"})])
        assert reply.status == 200 and mask_of(reply.body).shape == (50, 70)


def test_describe_names_each_family(tmp_path):
    mar = build("hf", MODEL_CONFIG, segformer_folder(tmp_path / "segformer"), tmp_path / "store")
    config = ServingConfig.from_dict(archive_doc(mar)["handler"])
    assert families.describe(config) == {"family": "hf", "arch": "hf", "model_type": "segformer",
                                         "architectures": ["SegformerForSemanticSegmentation"]}
    config = ServingConfig.from_dict({"model": {"name": "m", "arch": "smp:FPN", "weights": "w",
                                                "arch_params": {"encoder_name": "resnet34"}},
                                      "classes": CLASSES, "input": {"size": 64}})
    assert families.describe(config) == {"family": "smp", "arch": "smp:FPN",
                                         "arch_params": {"encoder_name": "resnet34"}}


# -- served: one TorchServe with an archive of every family ----------------------------------------------------
def zoo_archives(root):
    """The archives the served tests load, by name (the tiny models above, one worker each)."""
    config = root / "model-config.yaml"
    doc = yaml.safe_load(MODEL_CONFIG.read_text())
    config.write_text(yaml.safe_dump({**doc, "minWorkers": 1, "maxWorkers": 1}, sort_keys=False))
    store = root / "store"
    built = {
        "smp-unet": build("smp-unet", config, state_file(root / "smp.pt", "smp:Unet", **SMP_PARAMS), store,
                          arch="smp:Unet", arch_params=SMP_PARAMS, classes=CLASSES, input_size=SIZE),
        "hf-segformer": build("hf-segformer", config, segformer_folder(root / "segformer"), store),
        "monai-unet": build("monai-unet", config, state_file(root / "monai.pt", "monai:UNet", **MONAI_PARAMS), store,
                            arch="monai:UNet", arch_params=MONAI_PARAMS, classes=CLASSES, input_size=SIZE),
        "export": build("export", config, (exported_program(root / "tiny.pt2"), root / "tiny.pt2")[1], store,
                        classes=CLASSES, trust_code=True),
    }
    if HAS_SCIPY:
        built["hf-mask2former"] = build("hf-mask2former", config, mask2former_folder(root / "m2f"), store,
                                        input_size=SIZE)
        oneformer_folder(root / "oneformer")
        built["hf-oneformer"] = build("hf-oneformer", config, root / "oneformer", store, input_size=SIZE)
    if HAS_EINOPS:
        built["monai-swinunetr"] = build("monai-swinunetr", config,
                                         state_file(root / "swin.pt", "monai:SwinUNETR", **SWIN_PARAMS), store,
                                         arch="monai:SwinUNETR", arch_params=SWIN_PARAMS, classes=CLASSES,
                                         input_size=SIZE)
    return built


@pytest.fixture(scope="module")
def family_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    archives = zoo_archives(root)
    with torchserve(root, root / "store", [f"{name}={mar.name}" for name, mar in archives.items()], list(archives),
                    timeout=300) as ts:
        yield ts, archives, root


SERVED = ["smp-unet", "hf-segformer", "monai-unet", "export",
          pytest.param("hf-mask2former", marks=pytest.mark.skipif(not HAS_SCIPY, reason="needs the hf extra's scipy")),
          pytest.param("hf-oneformer", marks=pytest.mark.skipif(not HAS_SCIPY, reason="needs the hf extra's scipy")),
          pytest.param("monai-swinunetr",
                       marks=pytest.mark.skipif(not HAS_EINOPS, reason="needs the monai extra's einops"))]


@pytest.mark.integration
@pytest.mark.parametrize("name", SERVED)
def test_each_family_is_served_with_the_in_process_mask(family_zoo, name):
    ts, archives, root = family_zoo
    body = encode_image(random_image(97, 61, seed=5))
    served = requests.post(f"{ts.inference_url}/predictions/{name}", data=body,
                           headers={**ts.headers(), "Accept": "image/png"}, timeout=120)
    assert served.status_code == 200, served.text
    handler = unpacked_handler(archives[name], root / f"inprocess-{name}")
    (reply,) = handle(handler, [Request({"body": body}, {"Accept": "image/png"})])
    assert reply.status == 200
    mask = mask_of(served.content)
    assert mask.shape == (61, 97) and mask.max() < len(CLASSES)
    assert np.array_equal(mask, mask_of(reply.body))
    described = requests.get(f"{ts.management_url}/models/{name}", headers=ts.headers("management"), timeout=30)
    assert described.status_code == 200
    answer = requests.post(f"{ts.inference_url}/predictions/{name}", data=body, headers=ts.headers(), timeout=120)
    assert [c["name"] for c in answer.json()["classes"]] == CLASSES


@pytest.mark.integration
def test_make_serve_says_which_extra_a_model_needs(family_zoo, tmp_path):
    """`python -m segserve.tools.server start` (make serve) on an archive whose library the environment lacks
    (stood in for by a recorded distribution that is not installed) prints the worker's reason and the extra."""
    _, archives, _ = family_zoo
    project = tmp_path / "project"
    (project / "model-store").mkdir(parents=True)
    (project / "config.properties").write_text((REPO / "config.properties").read_text())
    with zipfile.ZipFile(archives["monai-unet"]) as src, \
            zipfile.ZipFile(project / "model-store" / "monai-unet.mar", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "model-config.yaml":
                doc = yaml.safe_load(data)
                doc["handler"]["model"]["requires"]["segserve-absent-library"] = "1.0"
                doc["maxRetryTimeoutInSec"] = 5
                data = yaml.safe_dump(doc, sort_keys=False).encode()
            dst.writestr(item, data)
    ports = free_ports("inference", "management", "metrics", "grpc_inference", "grpc_management")
    # PYTHONPATH: this checkout's segserve (the venv's own install may be another checkout's).
    python_path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, SEGSERVE_MODELS="monai-unet.mar", PYTHONPATH=python_path,
               **{f"SEGSERVE_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    result = subprocess.run([sys.executable, "-m", "segserve.tools.server", "start", "--repo", str(project),
                             "--timeout", "240"], env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert "failed while loading the model: segserve.families.MissingDependencyError" in first, result.stderr
    assert "segserve-absent-library==1.0" in first and "pip install 'segserve[monai]'" in first
