import pytest

from segserve.config import ConfigError, ServingConfig


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
    ({"tiling": [64]}, "handler.tiling must be a mapping"),
])
def test_bad_values_name_the_key(bad, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace(">", ">")):
        ServingConfig.from_dict(base_section(**bad))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ServingConfig.from_yaml(tmp_path / "nope.yaml")
