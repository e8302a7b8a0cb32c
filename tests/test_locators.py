"""Fixed locators (sketch_env.locators) and the pixel <-> location convention they share with the sensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sketch_env.geometry import location_to_pixel, pixel_to_location
from sketch_env.glimpse import extract_glimpses
from sketch_env.locators import fixed_locations


def _maps() -> torch.Tensor:
    """Two 8 x 8 level maps: sketch 0 inked at (col 1, row 2) from level 0 and (6, 5) from level 4;
    sketch 1 has no ink before level 16 (only (3, 3) then)."""
    maps = torch.full((2, 8, 8), 255, dtype=torch.uint8)
    maps[0, 2, 1] = 0
    maps[0, 5, 6] = 4
    maps[1, 3, 3] = 16
    return maps


def pixel(col: int, row: int, size: int = 8) -> torch.Tensor:
    """The location of the centre of pixel (col, row) of a size x size image."""
    return pixel_to_location(torch.tensor([col, row]), size)


def test_pixel_to_location_puts_the_glimpse_on_that_pixel():
    image = torch.zeros(1, 16, 12)  # 12 wide, 16 high: x and y scale apart
    image[0, 9, 4] = 1.0
    loc = pixel_to_location(torch.tensor([[4, 9]]), (12, 16))
    patch = extract_glimpses(image, loc, size=1, n_patches=1)
    assert patch.item() == pytest.approx(1.0)
    torch.testing.assert_close(location_to_pixel(loc, (12, 16)), torch.tensor([[4.0, 9.0]]))


def test_ink_rules_pick_inked_pixels_of_the_given_level():
    gen = torch.Generator().manual_seed(0)
    maps = _maps()
    for _ in range(10):
        at_0 = fixed_locations("ink", maps, torch.tensor([0, 0]), gen)
        torch.testing.assert_close(at_0[0], pixel(1, 2))
        torch.testing.assert_close(at_0[1], torch.zeros(2))  # no ink yet: the centre
        at_9 = fixed_locations("ink", maps, torch.tensor([9, 16]), gen)
        assert any(torch.allclose(at_9[0], pixel(c, r)) for c, r in ((1, 2), (6, 5)))
        torch.testing.assert_close(at_9[1], pixel(3, 3))
        newest = fixed_locations("newest-ink", maps, torch.tensor([9, 16]), gen)
        torch.testing.assert_close(newest[0], pixel(6, 5))


def test_ink_draws_uniformly_among_inked_pixels():
    maps = torch.full((1, 4, 4), 255, dtype=torch.uint8)
    maps[0, 0, :] = 0  # four inked pixels in the top row
    gen = torch.Generator().manual_seed(1)
    picks = torch.cat([fixed_locations("ink", maps, torch.tensor([0]), gen) for _ in range(400)])
    cols = location_to_pixel(picks, 4)[:, 0].round().long()
    counts = np.bincount(cols.numpy(), minlength=4)
    assert counts.min() > 60 and torch.all(location_to_pixel(picks, 4)[:, 1] == 0.0)


def test_centre_random_and_seeding():
    maps = _maps()
    assert torch.equal(fixed_locations("centre", maps, torch.tensor([0, 0]), torch.Generator()), torch.zeros(2, 2))
    a = fixed_locations("random", maps, torch.tensor([0, 0]), torch.Generator().manual_seed(5))
    b = fixed_locations("random", maps, torch.tensor([0, 0]), torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.abs().max() <= 1
    with pytest.raises(ValueError, match="unknown locator"):
        fixed_locations("corner", maps, torch.tensor([0, 0]), torch.Generator())


def test_nearest_ink_snaps_to_the_closest_inked_pixel_centre():
    from sketch_env.locators import nearest_ink

    images = torch.zeros(3, 8, 8, dtype=torch.uint8)
    images[0, 2, 1] = 1
    images[0, 6, 6] = 1
    images[1, 7, 0] = 1
    wanted = torch.tensor([[0.9, 0.9], [0.9, -0.9], [0.3, 0.2]])
    snapped = nearest_ink(images, wanted)
    torch.testing.assert_close(snapped[0], pixel(6, 6))
    torch.testing.assert_close(snapped[1], pixel(0, 7))
    torch.testing.assert_close(snapped[2], wanted[2])  # no ink: the location stays
