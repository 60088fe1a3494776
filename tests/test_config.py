import re
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import MODEL_CONFIG, REPO

from segserve.config import ConfigError, ServingConfig
from segserve.tools.build import TORCHSERVE_MODEL_KEYS, BuildError, build, check_torchserve_keys


def base_section(**overrides):
    section = {
        "model": {"name": "m", "version": "2", "arch": "unet", "weights": "w.safetensors"},
        "classes": [{"name": "bg", "color": [0, 0, 0]}, {"name": "fg", "color": [255, 0, 0]}],
        "input": {"size": [64, 96], "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
    }
    section.update(overrides)
    return section


def test_default_model_config_is_valid(config):
    assert config.name == "segmenter"
    assert config.class_names == ["background", "cell", "nucleus"]
    assert config.input_size == (256, 256)
    assert len(config.palette) == 768
    assert config.palette[3:6] == list(config.classes[1].color)


def test_from_dict_reads_sizes_and_defaults():
    cfg = ServingConfig.from_dict(base_section())
    assert cfg.input_size == (64, 96)
    assert cfg.num_classes == 2
    assert cfg.limits.max_pixels > 0
    assert cfg.version == "2"


def test_tiling_defaults_to_the_input_size_and_reads_its_settings(config):
    assert config.tile_size == config.input_size and 0 < config.tiling.overlap < 1
    cfg = ServingConfig.from_dict(base_section())
    assert cfg.tile_size == (64, 96) and cfg.tiling.batch > 0
    cfg = ServingConfig.from_dict(base_section(tiling={"tile_size": 128, "overlap": 0, "batch": 2,
                                                       "auto_above_pixels": 10}))
    assert (cfg.tile_size, cfg.tiling.overlap, cfg.tiling.batch, cfg.tiling.auto_above_pixels) == ((128, 128), 0, 2, 10)


def test_classes_as_plain_names_get_distinct_colors():
    cfg = ServingConfig.from_dict(base_section(classes=["a", "b", "c", "d"]))
    colors = [c.color for c in cfg.classes]
    assert len(set(colors)) == 4


@pytest.mark.parametrize("bad, words", [
    ({"classes": [{"name": "only"}]}, "at least 2 classes"),
    ({"input": {"size": [0, 10]}}, "handler.input.size"),
    ({"input": {"size": [8, 8], "std": [0, 1, 1]}}, "> 0"),
    ({"classes": [{"name": "a", "color": [0, 0, 300]}, {"name": "b"}]}, "0..255"),
    ({"model": {"name": "m", "arch": "unet"}}, "handler.model.weights"),
    ({"limits": {"max_bytes": -1}}, "max_bytes"),
    ({"tiling": {"overlap": 1.0}}, "handler.tiling.overlap"),
    ({"tiling": {"tile_size": [0, 64]}}, "handler.tiling.tile_size"),
    ({"tiling": {"batch": 0}}, "handler.tiling.batch"),
    ({"tiling": {"auto_above_pixels": "many"}}, "handler.tiling.auto_above_pixels"),
    ({"tiling": {"window": 64}}, "handler.tiling.window is not a setting"),
    ({"model": "unet"}, "handler.model must be a mapping"),
    ({"tiling": [64]}, "handler.tiling must be a mapping"),
])
def test_bad_values_name_the_key(bad, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace(">", ">")):
        ServingConfig.from_dict(base_section(**bad))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ServingConfig.from_yaml(tmp_path / "nope.yaml")


def test_a_file_without_a_handler_section_or_with_bad_yaml_is_a_config_error(tmp_path):
    (tmp_path / "top.yaml").write_text("minWorkers: 1\n")
    with pytest.raises(ConfigError, match="no `handler:` section"):
        ServingConfig.from_yaml(tmp_path / "top.yaml")
    (tmp_path / "bad.yaml").write_text("handler: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ServingConfig.from_yaml(tmp_path / "bad.yaml")


def with_key(path, value):
    """base_section() with `value` set at the dotted path (a section is created when missing)."""
    section = base_section()
    *parents, key = path.split(".")
    node = section
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[key] = value
    return section


# Every part of the `handler:` section refuses a key it does not know (a typo is never silently ignored),
# naming the key's full path and the closest valid key.
@pytest.mark.parametrize("path, suggestion", [
    ("limit", "handler.limits"),
    ("model.arch_param", "handler.model.arch_params"),
    ("classes.1.colour", "handler.classes[1].color"),
    ("classes.1.nmae", "handler.classes[1].name"),
    ("input.szie", "handler.input.size"),
    ("limits.max_pixel", "handler.limits.max_pixels"),
    ("tiling.overlapp", "handler.tiling.overlap"),
    ("runtime.precison", "handler.runtime.precision"),
])
def test_unknown_keys_are_refused_with_the_closest_valid_one(path, suggestion):
    with pytest.raises(ConfigError) as info:
        ServingConfig.from_dict(with_key(path, 5))
    where = "handler." + path.replace(".1.", "[1].")
    assert str(info.value).startswith(f"{where} is not a setting; did you mean {suggestion}?")


def test_an_unknown_key_without_a_close_one_lists_the_valid_keys():
    with pytest.raises(ConfigError) as info:
        ServingConfig.from_dict(with_key("runtime.gpu", True))
    message = str(info.value)
    assert message.startswith("handler.runtime.gpu is not a setting (valid keys: threads, channels_last")
    assert "did you mean" not in message


def test_arch_params_stay_free_form():
    cfg = ServingConfig.from_dict(with_key("model.arch_params", {"base_channels": 8, "anything": [1, 2]}))
    assert cfg.arch_params == {"base_channels": 8, "anything": [1, 2]}


@pytest.mark.parametrize("path, value, message", [
    ("runtime.threads", "two", "handler.runtime.threads must be a whole number >= 0, got 'two'"),
    ("runtime.threads", -1, "handler.runtime.threads must be a whole number >= 0, got -1"),
    ("runtime.threads", True, "handler.runtime.threads must be a whole number >= 0, got True"),
    ("limits.max_bytes", "5", "handler.limits.max_bytes must be a whole number >= 1, got '5'"),
    ("limits.max_pixels", 2.5, "handler.limits.max_pixels must be a whole number >= 1, got 2.5"),
    ("tiling.batch", 0, "handler.tiling.batch must be a whole number >= 1, got 0"),
    ("runtime.channels_last", "yes", "handler.runtime.channels_last must be true or false, got 'yes'"),
    ("runtime.compile", 1, "handler.runtime.compile must be true or false, got 1"),
    ("runtime.precision", "half", "handler.runtime.precision must be one of auto, fp32, fp16, bf16, got 'half'"),
    ("tiling.overlap", "0.25", "handler.tiling.overlap must be a fraction of the tile in [0, 1)"),
    ("input.mean", [0.5, "0.5", 0.5], "handler.input.mean must be three numbers (R, G, B)"),
    ("input.size", "256", "handler.input.size must be [height, width] in pixels"),
    ("classes.0.color", [0, 0, 1.5], r"handler.classes[0].color must be [r, g, b], whole numbers 0..255"),
    ("model.arch_params", [16], "handler.model.arch_params must be a mapping"),
    ("model.name", ["m"], "handler.model.name must be text, got ['m']"),
    ("runtime", "fast", "handler.runtime must be a mapping of settings (threads, channels_last"),
])
def test_wrong_types_name_the_key_and_the_expected_type(path, value, message):
    with pytest.raises(ConfigError) as info:
        ServingConfig.from_dict(with_key(path, value))
    assert str(info.value).startswith(message)


def test_empty_optional_sections_take_the_defaults():
    cfg = ServingConfig.from_dict(base_section(limits=None, tiling=None, runtime=None))
    assert (cfg.limits.max_pixels, cfg.tiling.overlap, cfg.threads, cfg.precision) == (40_000_000, 0.25, 0, "auto")


# -- the top-level keys TorchServe reads (it ignores a typo there without a word): checked at build --------
def torchserve_model_config_class() -> bytes:
    """ModelConfig.class from the installed TorchServe's frontend jar: the code that reads those keys."""
    import ts

    with zipfile.ZipFile(Path(ts.__file__).parent / "frontend" / "model-server.jar") as jar:
        return jar.read("org/pytorch/serve/archive/model/ModelConfig.class")


def test_the_torchserve_keys_are_those_of_the_installed_torchserve():
    code = torchserve_model_config_class()
    for key in TORCHSERVE_MODEL_KEYS:  # each is a string constant of the class (CONSTANT_Utf8: tag, length, bytes)
        assert b"\x01" + len(key).to_bytes(2, "big") + key.encode() in code, key
    # ...and every key the class warns about ("Invalid batchSize: {}, should be integer") is in the list
    # (TorchServe's message for maxRetryTimeoutInSec says maxRetryTimeoutInMin).
    warned = {name.decode() for name in re.findall(rb"Invalid (\w+): \{\}, should be", code)}
    assert warned - {"maxRetryTimeoutInMin"} | {"maxRetryTimeoutInSec"} == set(TORCHSERVE_MODEL_KEYS)


def write_config(tmp_path, **top):
    doc = yaml.safe_load(MODEL_CONFIG.read_text())
    doc.update(top)
    path = tmp_path / "model-config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("top, message", [
    ({"minWorker": 1}, "minWorker is not a TorchServe 0.12 model setting; did you mean minWorkers?"),
    ({"maxbatchdelay": 5}, "maxbatchdelay is not a TorchServe 0.12 model setting; did you mean maxBatchDelay?"),
    ({"handlers": {}}, "handlers is not a TorchServe 0.12 model setting; did you mean handler?"),
    ({"batchSize": "4"}, "batchSize must be a whole number >= 1, got '4'"),
    ({"responseTimeout": 0}, "responseTimeout must be a whole number >= 1, got 0"),
    ({"maxWorkers": 2.0}, "maxWorkers must be a whole number >= 0, got 2.0"),
    ({"deviceType": "cuda"}, "deviceType must be one of cpu, gpu, got 'cuda'"),
    ({"deviceIds": [0, "1"]}, "deviceIds[1] must be a whole number >= 0, got '1'"),
    ({"useVenv": "no"}, "useVenv must be true or false, got 'no'"),
])
def test_the_build_refuses_top_level_keys_torchserve_would_ignore(tmp_path, top, message):
    path = write_config(tmp_path, **top)
    with pytest.raises(BuildError) as info:
        build("m", path, REPO / "model" / "segmenter.safetensors", tmp_path / "store")
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message} (valid keys")
    assert not (tmp_path / "store" / "m.mar").exists()


def test_the_top_level_keys_torchserve_reads_pass():
    doc = {"minWorkers": 1, "maxWorkers": 2, "batchSize": 4, "deviceType": "GPU", "deviceIds": [0, 1],
           "torchrun": {"nproc-per-node": 2}, "continuousBatching": False, "handler": {}}
    check_torchserve_keys(doc)
    check_torchserve_keys(yaml.safe_load(MODEL_CONFIG.read_text()))
