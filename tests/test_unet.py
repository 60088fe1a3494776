"""The default architecture: any input size in, logits of the same size out, small enough to commit."""

import pytest
import torch

from segserve.families import build_model


@pytest.mark.parametrize("shape", [(1, 3, 97, 131), (2, 3, 64, 64), (1, 3, 1, 1), (1, 3, 257, 33)])
def test_output_matches_input_size(shape):
    model = build_model("unet", 3, base_channels=4, depth=3).eval()
    with torch.inference_mode():
        out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 3, shape[2], shape[3])


def test_num_classes_and_default_size(config):
    model = build_model(config.arch, 5, **config.arch_params)
    with torch.inference_mode():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape[1] == 5
    default = build_model(config.arch, config.num_classes, **config.arch_params)
    size = sum(t.numel() * t.element_size() for t in default.state_dict().values())
    assert size <= 10 * 1024 * 1024


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="unet"):
        build_model("resnet9000", 3)
