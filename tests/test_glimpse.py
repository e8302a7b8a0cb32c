import pytest
import torch

from sketch_env.glimpse import GlimpseSensor, extract_glimpses, glimpses_from_integral, integral_image


def ramp(batch: int = 1, size: int = 64) -> torch.Tensor:
    """Images whose every pixel value is distinct, so a shifted crop cannot pass for the right one."""
    values = torch.arange(batch * size * size, dtype=torch.float32).view(batch, size, size)
    return values / values.numel()


def block_mean(region: torch.Tensor, factor: int) -> torch.Tensor:
    side = region.shape[-1] // factor
    return region.reshape(side, factor, side, factor).mean(dim=(1, 3))


def test_centre_glimpse_is_the_centre_crop_and_area_averages():
    image = ramp()
    glimpse = extract_glimpses(image, torch.zeros(1, 2))
    assert glimpse.shape == (1, 3, 8, 8)
    torch.testing.assert_close(glimpse[0, 0], image[0, 28:36, 28:36], rtol=0, atol=1e-6)
    torch.testing.assert_close(glimpse[0, 1], block_mean(image[0, 24:40, 24:40], 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(glimpse[0, 2], block_mean(image[0, 16:48, 16:48], 4), rtol=0, atol=1e-6)


def test_off_centre_pixel_aligned_glimpse():
    image = ramp()
    # x = -0.5 is pixel edge 16, y = 0.25 is pixel edge 40; patch 0 spans 4 pixels either side
    glimpse = extract_glimpses(image, torch.tensor([[-0.5, 0.25]]), size=8, n_patches=2, scale=3.0)
    torch.testing.assert_close(glimpse[0, 0], image[0, 36:44, 12:20], rtol=0, atol=1e-6)
    torch.testing.assert_close(glimpse[0, 1], block_mean(image[0, 28:52, 4:28], 3), rtol=0, atol=1e-6)


def test_half_pixel_shift_averages_neighbours():
    image = ramp()
    glimpse = extract_glimpses(image, torch.tensor([[1 / 64, 0.0]]), n_patches=1)  # half a pixel right
    expected = (image[0, 28:36, 28:36] + image[0, 28:36, 29:37]) / 2
    torch.testing.assert_close(glimpse[0, 0], expected, rtol=0, atol=1e-5)


def test_corners_read_zeros_outside_the_image():
    ones = torch.ones(1, 64, 64)
    for corner, inside in [((-1.0, -1.0), (slice(4, 8), slice(4, 8))), ((1.0, 1.0), (slice(0, 4), slice(0, 4)))]:
        glimpse = extract_glimpses(ones, torch.tensor([corner]))
        for patch in range(3):
            expected = torch.zeros(8, 8)
            expected[inside] = 1
            torch.testing.assert_close(glimpse[0, patch], expected, rtol=0, atol=1e-6)


def test_glimpse_far_outside_is_blank():
    glimpse = extract_glimpses(torch.ones(1, 64, 64), torch.tensor([[5.0, -7.0]]))
    assert torch.equal(glimpse, torch.zeros(1, 3, 8, 8))


def test_batch_equals_single_calls():
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(5, 64, 64, generator=generator) < 0.2).float()
    locations = torch.rand(5, 2, generator=generator) * 2.4 - 1.2
    batch = extract_glimpses(images, locations)
    for i in range(5):
        assert torch.equal(batch[i : i + 1], extract_glimpses(images[i : i + 1], locations[i : i + 1]))


def test_integral_path_and_sensor_agree():
    images = ramp(3)
    locations = torch.tensor([[0.1, -0.3], [0.0, 0.0], [-0.9, 0.7]])
    sensor = GlimpseSensor(size=6, n_patches=4, scale=1.5)
    assert sensor.observation_shape == (4, 6, 6)
    direct = sensor(images, locations)
    assert direct.shape == (3, 4, 6, 6)
    assert torch.equal(direct, sensor.from_integral(integral_image(images), locations))
    assert torch.equal(direct, glimpses_from_integral(integral_image(images), locations, 6, 4, 1.5))


def test_glimpse_keeps_the_ink_it_covers():
    # a patch that covers the whole image sums (as mean * area) to the total ink
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 16, 16, generator=generator)
    glimpse = extract_glimpses(images, torch.zeros(2, 2), size=4, n_patches=3, scale=2.0)
    torch.testing.assert_close(glimpse[:, 2].sum(dim=(1, 2)) * 16, images.sum(dim=(1, 2)), rtol=1e-5, atol=1e-4)


def test_bad_inputs_raise():
    images = torch.zeros(2, 64, 64)
    with pytest.raises(ValueError, match="finite"):
        extract_glimpses(images, torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="finite"):
        extract_glimpses(images, torch.tensor([[0.0, 0.0], [float("inf"), 0.0]]))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        extract_glimpses(images, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        extract_glimpses(torch.zeros(2, 1, 64, 64), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        extract_glimpses(torch.zeros(2, 64, 64, dtype=torch.uint8), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="scale"):
        GlimpseSensor(scale=0.5)
    with pytest.raises(ValueError, match="n_patches"):
        GlimpseSensor(n_patches=0)
