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


def test_overlay_greys_the_input_and_outlines_each_region_in_its_colour(config):
    # A green stain under a green class: in grey, only the mask carries colour.
    image = Image.new("RGB", (30, 20), (0, 200, 0))
    mask = np.zeros((20, 30), np.uint8)
    mask[4:16, 5:25] = 1
    mask[8:12, 10:15] = 2
    out = np.asarray(overlay(image, mask, config, legend=False)).astype(int)
    grey = round(0.587 * 200)  # Pillow's L = R*299/1000 + G*587/1000 + B*114/1000
    assert (np.abs(out[mask == 0] - grey) <= 1).all()
    for edge_pixel, class_id in (((4, 12), 1), ((15, 5), 1), ((4, 24), 1), ((8, 12), 2), ((11, 10), 2)):
        assert out[edge_pixel].tolist() == list(config.classes[class_id].color), (edge_pixel, class_id)
    inside = np.round(grey * 0.55 + np.array(config.classes[1].color) * 0.45)
    assert (np.abs(out[6, 8] - inside) <= 1).all()
