"""Bring your own model: architectures, model files, checkpoint shapes, refusals; served side by side."""

from __future__ import annotations

import io
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file
from support import MODEL_CONFIG, REPO, encode_image, random_image, torchserve
from support.handlers import archive_doc

from segserve import families
from segserve.config import ServingConfig
from segserve.families import TORCHVISION_ARCHS, build_model
from segserve.tools.build import BuildError, build, main, read_state_dict

CLASSES = ["background", "road", "car"]
SMALL = [64, 64]

# The classic "embed a PyTorch segmentation model" recipe: a two-layer toy network, 2 classes.
TOY = textwrap.dedent('''
    import torch.nn as nn

    class ToySegmenter(nn.Module):
        def __init__(self, num_classes=2):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
            self.conv2 = nn.Conv2d(8, num_classes, kernel_size=1)

        def forward(self, x):
            return self.conv2(self.conv1(x).relu())
''')


def toy_files(tmp_path):
    model_file = tmp_path / "toy_model.py"
    model_file.write_text(TOY)
    namespace: dict = {}
    exec(TOY, namespace)
    torch.manual_seed(0)
    weights = tmp_path / "toy.pt"
    torch.save(namespace["ToySegmenter"](num_classes=2).state_dict(), weights)
    return model_file, weights


def unet_state():
    torch.manual_seed(1)
    return build_model("unet", 3, base_channels=16, depth=3).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel", "safetensors"])
def test_checkpoint_shapes_are_unwrapped(tmp_path, wrap):
    state = unet_state()
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pt")
    if wrap == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state},
               "dataparallel": {f"module.{k}": v for k, v in state.items()}}[wrap]
        torch.save(obj, path)
    assert set(read_state_dict(path)) == set(state)
    mar = build("wrapped", MODEL_CONFIG, path, tmp_path / "store")
    assert "weights.safetensors" in zipfile.ZipFile(mar).namelist()


def test_a_pickled_model_object_is_refused_with_a_hint(tmp_path):
    torch.save(build_model("unet", 3, base_channels=4, depth=2), tmp_path / "whole.pt")
    with pytest.raises(BuildError, match=r"never unpickles code.*state_dict\(\)"):
        read_state_dict(tmp_path / "whole.pt")


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    code = main(["--weights", str(tmp_path / "evil.pth"), "--export-path", str(tmp_path / "store")])
    assert code == 2 and not marker.exists()
    assert not (tmp_path / "store" / "segmenter.mar").exists()


def test_mismatched_state_dict_fails_the_build_with_keys_listed(tmp_path, capsys):
    state = build_model("fcn_resnet50", 5, aux_loss=False).state_dict()
    torch.save(state, tmp_path / "five.pt")
    code = main(["--name", "roads", "--arch", "fcn_resnet50", "--weights", str(tmp_path / "five.pt"),
                 "--classes", ",".join(CLASSES), "--export-path", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2
    assert "shape mismatches (2)" in err and "classifier.4.weight" in err and "(5, 512, 1, 1)" in err
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_wrong_class_count_from_a_model_file_is_caught_by_the_forward_pass(tmp_path, capsys):
    model_file, weights = toy_files(tmp_path)
    code = main(["--name", "toy", "--model-file", str(model_file), "--model-class", "ToySegmenter",
                 "--model-args", '{"num_classes": 2}', "--weights", str(weights), "--classes", "a,b,c",
                 "--export-path", str(tmp_path / "store"), "--trust-code"])
    assert code == 2
    assert "the model outputs 2 channel(s) but 3 classes are configured (a, b, c)" in capsys.readouterr().err


def test_torchscript_weights(tmp_path):
    model = build_model("unet", 3, base_channels=4, depth=2).eval()
    scripted = torch.jit.trace(model, torch.zeros(1, 3, 64, 64))
    scripted.save(str(tmp_path / "scripted.pt"))
    mar = build("scripted", MODEL_CONFIG, tmp_path / "scripted.pt", tmp_path / "store", trust_code=True)
    config = archive_doc(mar)["handler"]
    assert config["model"]["arch"] == "torchscript"


def test_torchvision_archs_default_to_photo_settings_and_whole_image_inference(tmp_path):
    torch.manual_seed(0)
    torch.save(build_model("lraspp_mobilenet_v3_large", 3).state_dict(), tmp_path / "w.pt")
    mar = build("photos", MODEL_CONFIG, tmp_path / "w.pt", tmp_path / "store", arch="lraspp_mobilenet_v3_large",
                classes=CLASSES)
    config = archive_doc(mar)["handler"]
    assert config["input"]["size"] == [520, 520] and config["input"]["mean"] == [0.485, 0.456, 0.406]
    # tile=auto must not cut a photo into windows: only images over the pixel limit (refused anyway) would be.
    assert config["tiling"]["auto_above_pixels"] == config["limits"]["max_pixels"]
    assert config["tiling"]["overlap"] == 0.25  # the rest of the base file's tiling section is kept
    default = archive_doc(build("seg", MODEL_CONFIG, REPO / "model" / "segmenter.safetensors",
                                tmp_path / "store"))["handler"]
    assert default["tiling"]["auto_above_pixels"] == 1048576


def test_classes_from_files(tmp_path):
    from segserve.tools.build import read_class_list

    (tmp_path / "c.txt").write_text("background\nroad\n\ncar\n")
    (tmp_path / "c.json").write_text('[{"name": "background", "color": [0, 0, 0]}, "road"]')
    assert read_class_list(str(tmp_path / "c.txt")) == CLASSES
    assert read_class_list(str(tmp_path / "c.json"))[1] == "road"
    assert read_class_list("a, b") == ["a", "b"]
    with pytest.raises(BuildError, match="not found"):
        read_class_list(str(tmp_path / "missing.json"))


# -- the family registry ------------------------------------------------------------------------------------
def test_every_architecture_belongs_to_exactly_one_family():
    listed = families.all_architectures()  # a prefix family's names from its library (smp:Unet, monai:UNet...)
    names = [name for family_names in listed.values() for name in family_names]
    assert len(names) == len(set(names))
    assert all(families.family_of(name).name == family for family, found in listed.items() for name in found)
    assert set(listed) == {"unet", "torchvision", "smp", "hf", "monai", "custom", "torchscript", "export"}
    assert {"smp:Unet", "smp:FPN", "smp:DeepLabV3Plus", "monai:UNet", "monai:SwinUNETR"} <= set(names)
    assert families.family_of("fcn_resnet50").name == "torchvision"
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'; choose one of: custom, "):
        families.family_of("resnet9000")


def archive_config(arch, num_classes, weights, **params):
    return ServingConfig.from_dict({"model": {"name": "m", "arch": arch, "weights": weights, "arch_params": params},
                                    "classes": [f"c{i}" for i in range(num_classes)], "input": {"size": 32}})


def test_load_model_returns_a_module_whose_output_is_always_logits(tmp_path):
    """torchvision's {"out", "aux"} dict, a custom model's {"out"} dict and a scripted dict model all
    come out of load_model as the (N, C, H, W) logits tensor; the unet is not wrapped."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    fcn = build_model("fcn_resnet50", 3, aux_loss=True).eval()
    save_file(fcn.state_dict(), str(tmp_path / "fcn.safetensors"))
    loaded = families.load_model(archive_config("fcn_resnet50", 3, "x", aux_loss=True), tmp_path / "fcn.safetensors")
    with torch.inference_mode():
        assert torch.equal(loaded(x), fcn(x)["out"])

    (tmp_path / "dict_model.py").write_text(textwrap.dedent('''
        import torch.nn as nn

        class DictOut(nn.Module):
            def __init__(self, num_classes=2):
                super().__init__()
                self.conv = nn.Conv2d(3, num_classes, 1)

            def forward(self, x):
                return {"out": self.conv(x)}
    '''))
    sys.path.insert(0, str(tmp_path))
    try:
        custom = build_model("custom", 2, module="dict_model", **{"class": "DictOut"}).eval()
        torch.save(custom.state_dict(), tmp_path / "custom.pt")
        config = archive_config("custom", 2, "x", module="dict_model", **{"class": "DictOut"})
        loaded = families.load_model(config, tmp_path / "custom.pt")
        scripted_path = tmp_path / "scripted.pt"
        torch.jit.script(custom).save(str(scripted_path))
        scripted = families.load_model(archive_config("torchscript", 2, "x"), scripted_path)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dict_model", None)
    with torch.inference_mode():
        assert torch.equal(loaded(x), custom(x)["out"]) and torch.equal(scripted(x), custom(x)["out"])

    unet = build_model("unet", 3, base_channels=4, depth=2)
    save_file(unet.state_dict(), str(tmp_path / "unet.safetensors"))
    config = archive_config("unet", 3, "x", base_channels=4, depth=2)
    loaded = families.load_model(config, tmp_path / "unet.safetensors")
    assert type(loaded) is type(unet) and not loaded.training


def test_describe_names_the_family_and_its_details(config):
    assert families.describe(config) == {"family": "unet", "arch": "unet", "arch_params": dict(config.arch_params)}
    custom = archive_config("custom", 2, "weights.safetensors", module="toy_model", kwargs={"width": 8},
                            **{"class": "Toy"})
    assert families.describe(custom) == {"family": "custom", "arch": "custom", "module": "toy_model",
                                         "class": "Toy", "kwargs": {"width": 8}}
    assert families.describe(archive_config("torchscript", 2, "model.torchscript.pt")) == {
        "family": "torchscript", "arch": "torchscript", "file": "model.torchscript.pt"}


def test_a_dict_output_without_out_fails_the_build_plainly(tmp_path, capsys):
    model_file = tmp_path / "odd_model.py"
    model_file.write_text(TOY.replace("ToySegmenter", "Odd").replace(
        "return self.conv2(self.conv1(x).relu())", "return {'logits': self.conv2(self.conv1(x).relu())}"))
    exec(model_file.read_text(), namespace := {})
    torch.save(namespace["Odd"]().state_dict(), tmp_path / "odd.pt")
    code = main(["--model-file", str(model_file), "--model-class", "Odd", "--weights", str(tmp_path / "odd.pt"),
                 "--classes", "a,b", "--export-path", str(tmp_path / "store"), "--trust-code"])
    assert code == 2
    assert "forward pass failed" in (err := capsys.readouterr().err) and "without an 'out' entry (keys: logits)" in err


def test_a_custom_arch_without_its_module_says_how_to_give_it(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    code = main(["--arch", "custom", "--weights", str(tmp_path / "w.pt"), "--classes", "a,b",
                 "--export-path", str(tmp_path / "store"), "--trust-code"])
    assert code == 2 and "--model-file FILE.py --model-class NAME" in capsys.readouterr().err


# -- served side by side ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One TorchServe with every torchvision architecture, the toy model and two versions of the default."""
    root = tmp_path_factory.mktemp("zoo")
    store = root / "store"
    for arch in TORCHVISION_ARCHS:
        torch.manual_seed(0)
        weights = root / f"{arch}.pt"
        # Trained with the auxiliary head where the architecture has one, as torchvision's recipes do.
        aux = {} if arch.startswith("lraspp") else {"aux_loss": True}
        torch.save(build_model(arch, len(CLASSES), **aux).state_dict(), weights)
        build(arch, MODEL_CONFIG, weights, store, arch=arch, classes=CLASSES, input_size=SMALL)
        weights.unlink()
    model_file, toy_weights = toy_files(root)
    build("toy", MODEL_CONFIG, toy_weights, store, model_file=model_file, model_class="ToySegmenter",
          classes=["background", "foreground"], input_size=SMALL, trust_code=True)
    default_weights = REPO / "model" / "segmenter.safetensors"
    build("segmenter", MODEL_CONFIG, default_weights, store, version="1.0", archive_name="segmenter-1.0")
    build("segmenter", MODEL_CONFIG, default_weights, store, version="2.0", archive_name="segmenter-2.0")
    with torchserve(root, store, sorted(p.name for p in store.glob("*.mar")),
                    (*TORCHVISION_ARCHS, "toy", "segmenter"), timeout=300) as ts:
        yield ts


def predict(ts, path, image, **headers):
    return requests.post(f"{ts.inference_url}/predictions/{path}", data=encode_image(image),
                         headers={**ts.headers(), **headers}, timeout=120)


@pytest.mark.integration
@pytest.mark.parametrize("name", [*TORCHVISION_ARCHS, "toy"])
def test_each_architecture_serves_masks_at_input_size(zoo, name):
    response = predict(zoo, name, random_image(97, 61, seed=3), Accept="image/png")
    assert response.status_code == 200, response.text
    mask = np.asarray(Image.open(io.BytesIO(response.content)))
    assert mask.shape == (61, 97)
    assert mask.max() < (2 if name == "toy" else len(CLASSES))
    body = predict(zoo, name, random_image(40, 30)).json()
    assert [c["name"] for c in body["classes"]] == (["background", "foreground"] if name == "toy" else CLASSES)


@pytest.mark.integration
def test_versions_side_by_side_with_routing_and_default(zoo):
    image = random_image(50, 40)
    assert predict(zoo, "segmenter/1.0", image).json()["version"] == "1.0"
    assert predict(zoo, "segmenter/2.0", image).json()["version"] == "2.0"
    headers = zoo.headers("management")
    url = f"{zoo.management_url}/models/segmenter"
    described = requests.get(f"{url}/all", headers=headers, timeout=30).json()
    assert sorted(m["modelVersion"] for m in described) == ["1.0", "2.0"]
    for version in ("2.0", "1.0"):
        response = requests.put(f"{url}/{version}/set-default", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        assert predict(zoo, "segmenter", image).json()["version"] == version
