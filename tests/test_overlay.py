import numpy as np
from PIL import Image

from segserve.encoders import overlay


def test_overlay_tints_only_foreground(config):
    image = Image.new("RGB", (60, 40), (100, 100, 100))
    mask = np.zeros((40, 60), np.uint8)
    mask[30:, 40:] = 1
    out = np.asarray(overlay(image, mask, config, legend=False))
    assert out.shape == (40, 60, 3)
    assert (out[:30, :40] == 100).all()
    expected = np.round(np.array([100, 100, 100]) * 0.55 + np.array(config.classes[1].color) * 0.45)
    assert np.array_equal(out[35, 50], expected.astype(np.uint8))
