"""The scene generator: deterministic by seed, labels that mean what they say."""

import numpy as np
import pytest

from segserve.tools.synthetic import BACKGROUND, CELL, NUCLEUS, generate_scene


def test_same_seed_same_scene_and_different_seed_differs():
    a_image, a_mask = generate_scene(5)
    b_image, b_mask = generate_scene(5)
    assert np.array_equal(a_image, b_image) and np.array_equal(a_mask, b_mask)
    c_image, _ = generate_scene(6)
    assert not np.array_equal(a_image, c_image)


@pytest.mark.parametrize("size", [(256, 256), (97, 131), (384, 512)])
def test_shapes_and_dtypes(size):
    image, mask = generate_scene(1, size)
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert mask.shape == size and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {BACKGROUND, CELL, NUCLEUS}


def test_typical_scenes_have_all_classes():
    with_all = sum(len(np.unique(generate_scene(seed)[1])) == 3 for seed in range(20))
    assert with_all >= 18


def test_every_nucleus_lies_inside_a_cell():
    for seed in range(10):
        _, mask = generate_scene(seed)
        nucleus = mask == NUCLEUS
        # Any nucleus pixel's 4-neighbourhood is never background: nuclei are enclosed by cytoplasm or the border.
        padded = np.pad(mask, 1, mode="edge")
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        assert not any(((n == BACKGROUND) & nucleus).any() for n in neighbours)


def test_image_is_brighter_on_cells_than_background_but_not_the_mask():
    image, mask = generate_scene(3)
    green = image[..., 1].astype(float)
    assert green[mask == CELL].mean() > green[mask == BACKGROUND].mean() + 30
    assert image[..., 2][mask == NUCLEUS].mean() > image[..., 2][mask == CELL].mean()
    # Noise and blur: the image is no relabelled copy of the mask.
    assert len(np.unique(image[..., 1][mask == BACKGROUND])) > 5
