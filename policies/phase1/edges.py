"""Photos as line drawings: edge thinning and the pen, shared by the gradient edge maps and HED.

`photo_edges` (Canny-like, from image gradients) and `policies.phase1.hed.hed_edges` both thin their
edge maps to one-pixel lines across the edge (`non_maximum_suppression`) and draw them with the pen the
sketches are rendered with (`drawn_with_pen`), so photo and sketch inputs have the same line width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sketch_env.render import default_thickness


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with reflect padding."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def photo_edges(photos, size: int = 64, sigma: float = 1.0, low: float = 0.08, high: float = 0.25) -> torch.Tensor:
    """Canny-like edge maps of photos, drawn like a sketch: (N, H, W, 3) uint8 -> (N, 1, size, size).

    Grey -> Gaussian blur -> Sobel gradient -> non-maximum suppression across the gradient
    direction (4 directions) -> soft threshold: a thin edge gets ink = clamp((m - low) / (high - low))
    where m is the gradient magnitude over the image's largest magnitude. The thin map is computed at
    the input resolution, max-pooled to `size` (one pixel wide lines) and thickened with the square
    pen that `sketch_env.render` draws sketches with at that size, so both inputs have the same
    line width. Vectorised over the whole batch.
    """
    x = torch.as_tensor(photos)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"photo_edges expects (N, H, W, 3) uint8 photos, got shape {tuple(x.shape)}")
    rgb = x.permute(0, 3, 1, 2).float() / 255.0
    grey = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3])
    grey = _gaussian_blur(grey, sigma)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))
    mag = torch.sqrt(gx * gx + gy * gy)
    thin = non_maximum_suppression(mag, gx, gy)
    scale = thin.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return drawn_with_pen(((thin / scale - low) / (high - low)).clamp(0.0, 1.0), size)


def non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Edge maps (N, 1, H, W) thinned to one-pixel lines: a pixel keeps its magnitude only if it is the
    largest of its two neighbours along the gradient (gx, gy), quantised to 0, 45, 90, 135 degrees."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    sector = (((angle + 22.5) // 45.0) % 4).long()
    m = F.pad(magnitude, (1, 1, 1, 1))
    h, w = magnitude.shape[-2:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return m[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    offsets = ((0, 1), (1, 1), (1, 0), (1, -1))  # (dy, dx) along the gradient for each sector
    neighbour_max = torch.stack(
        [torch.maximum(shifted(dy, dx), shifted(-dy, -dx)) for dy, dx in offsets], dim=0
    ).gather(0, sector.unsqueeze(0)).squeeze(0)
    return torch.where(magnitude >= neighbour_max, magnitude, torch.zeros_like(magnitude))


def drawn_with_pen(ink: torch.Tensor, size: int) -> torch.Tensor:
    """Thin ink maps (N, 1, H, W) in [0, 1] as a sketch is drawn at `size`: max-pooled to size x size
    (one pixel wide lines) and thickened with the square pen `sketch_env.render` draws sketches with."""
    if ink.shape[-2:] != (size, size):
        ink = F.adaptive_max_pool2d(ink, (size, size))
    side = default_thickness(size)
    if side > 1:  # ink at p spreads to p - (side - 1) // 2 ... p + side // 2, as in render._min_filter
        lo, hi = (side - 1) // 2, side // 2
        ink = F.max_pool2d(F.pad(ink, (lo, hi, lo, hi)), side, stride=1)
    return ink


def thin_edges(prob: torch.Tensor) -> torch.Tensor:
    """Non-maximum suppression of (N, 1, H, W) edge maps across the edge (the direction from the
    gradient of the 3 x 3 smoothed map)."""
    gy, gx = torch.gradient(F.avg_pool2d(F.pad(prob, (1, 1, 1, 1), mode="replicate"), 3, 1), dim=(-2, -1))
    return non_maximum_suppression(prob, gx, gy)


__all__ = ["drawn_with_pen", "non_maximum_suppression", "photo_edges", "thin_edges"]
