"""The scene generator: deterministic by seed, labels that mean what they say."""

import numpy as np
import pytest

from segserve.synthetic import BACKGROUND, CELL, NUCLEUS, generate_dataset, generate_scene


def test_same_seed_same_scene_and_different_seed_differs():
    a_image, a_mask = generate_scene(5)
    b_image, b_mask = generate_scene(5)
    assert np.array_equal(a_image, b_image) and np.array_equal(a_mask, b_mask)
    c_image, c_mask = generate_scene(6)
    assert not np.array_equal(a_image, c_image) and not np.array_equal(a_mask, c_mask)


@pytest.mark.parametrize("size", [(256, 256), (97, 131), (384, 512), (16, 16)])
def test_shapes_and_dtypes(size):
    image, mask = generate_scene(1, size)
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert mask.shape == size and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {BACKGROUND, CELL, NUCLEUS}


def test_dataset_stacks_scenes_by_seed():
    images, masks = generate_dataset([3, 4], (64, 80))
    assert images.shape == (2, 64, 80, 3) and masks.shape == (2, 64, 80)
    image, mask = generate_scene(4, (64, 80))
    assert np.array_equal(images[1], image) and np.array_equal(masks[1], mask)


def test_typical_scenes_have_all_classes_in_varied_amounts():
    masks = [generate_scene(seed)[1] for seed in range(20)]
    assert sum(len(np.unique(mask)) == 3 for mask in masks) >= 18
    cell_share = [np.isin(mask, (CELL, NUCLEUS)).mean() for mask in masks]
    assert 0.1 < np.mean(cell_share) < 0.4 and max(cell_share) - min(cell_share) > 0.1


def test_every_nucleus_lies_inside_a_cell():
    for seed in range(20):
        _, mask = generate_scene(seed)
        nucleus = mask == NUCLEUS
        # A nucleus pixel's 4-neighbourhood is never background: cytoplasm (or the image border) encloses it.
        padded = np.pad(mask, 1, mode="edge")
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        assert not any(((n == BACKGROUND) & nucleus).any() for n in neighbours)


def test_fluorescence_colours_blur_and_noise():
    image, mask = generate_scene(3)
    green, blue = image[..., 1].astype(float), image[..., 2].astype(float)
    assert green[mask == BACKGROUND].mean() < 40  # a dark field
    assert green[mask == CELL].mean() > green[mask == BACKGROUND].mean() + 30
    assert blue[mask == NUCLEUS].mean() > blue[mask == CELL].mean() + 30
    # Noise and blur: the image is no relabelled copy of the mask.
    assert len(np.unique(green[mask == BACKGROUND])) > 5
    assert len(np.unique(green[mask == CELL])) > 20
