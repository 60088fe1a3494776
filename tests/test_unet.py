"""The default architecture: any input size in, logits of the same size out, small enough to commit."""

import pytest
import torch

from segserve.models import build_model
from segserve.unet import UNet


@pytest.mark.parametrize("shape", [(1, 3, 97, 131), (2, 3, 64, 64), (1, 3, 1, 1), (1, 3, 257, 33), (1, 3, 257, 311)])
def test_output_matches_input_size(shape):
    model = build_model("unet", 3, base_channels=4, depth=3).eval()
    with torch.inference_mode():
        out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 3, shape[2], shape[3]) and out.dtype == torch.float32


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_depths(depth):
    model = UNet(num_classes=2, base_channels=4, depth=depth).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 45, 23)).shape == (1, 2, 45, 23)


def test_num_classes_and_default_size(config):
    model = build_model(config.arch, 5, **config.arch_params)
    with torch.inference_mode():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape[1] == 5
    default = build_model(config.arch, config.num_classes, **config.arch_params)
    size = sum(t.numel() * t.element_size() for t in default.state_dict().values())
    assert size <= 10 * 1024 * 1024


def test_memory_layout_changes_neither_keys_nor_results():
    torch.manual_seed(0)
    fast = UNet(3, base_channels=4, depth=2).eval()
    plain = UNet(3, base_channels=4, depth=2, channels_last=False).eval()
    state = {k: v.contiguous() for k, v in fast.state_dict().items()}
    plain.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 33, 47)
    with torch.inference_mode():
        assert torch.allclose(fast(x), plain(x), atol=1e-5)
    assert fast(x).is_contiguous()


def test_train_mode_backward():
    model = UNet(3, base_channels=4, depth=2).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 30, 30)), torch.randint(0, 3, (2, 30, 30)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="unet"):
        build_model("resnet9000", 3)
