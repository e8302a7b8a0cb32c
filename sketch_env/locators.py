"""Fixed locators: where a rule, not a policy, would look next. The yardstick for a learned locator.

A trained policy's own locator is worth something only if it beats the simplest rules with
everything else held equal (`darp evaluate --locator RULE` swaps the rule in for the policy's
location and keeps its glimpse network, core and action network):

- `centre`: always the centre of the canvas;
- `random`: uniform over the canvas;
- `ink`: a uniformly drawn inked pixel of the partial sketch the glimpse will be taken on;
- `newest-ink`: a uniformly drawn pixel of the newest ink of that partial sketch (the pixels first
  inked at the latest completion level that added any, i.e. on the stroke drawn last).

Every rule takes the partial sketches the next glimpses will read, as first-ink level maps
(`sketch_env.render.first_ink_level`: pixel p is inked at level L iff map[p] <= L), and the level
of each, and returns locations (B, 2) in the glimpse sensor's convention (`sketch_env.glimpse`).
A sketch with no ink at that level gets the centre.
"""

from __future__ import annotations

import torch

from sketch_env.geometry import pixel_to_location
from sketch_env.render import N_LEVELS

LOCATORS = ("centre", "random", "ink", "newest-ink")


def fixed_locations(
    rule: str, level_maps: torch.Tensor, level: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Locations (B, 2) chosen by `rule` for partial sketches level_maps (B, H, W) uint8 at `level` (B,)."""
    return InkTable(level_maps)(rule, torch.arange(len(level_maps)), level, generator)


class InkTable:
    """The fixed rules for many draws on the same S sketches, at any of their levels.

    Each sketch's pixels are sorted by the level that inks them (once), so the pixels inked by level
    L are a prefix of that order and the newest ones (first inked at the latest level <= L that added
    any) a segment of it: a draw is one uniform index into a segment, with no pass over the image.
    Memory: S x H x W int32 (38 MiB for 600 sketches at 128 x 128).
    """

    def __init__(self, level_maps: torch.Tensor):
        if level_maps.ndim != 3:
            raise ValueError(f"level maps must have shape (S, H, W), got {tuple(level_maps.shape)}")
        s, self.h, self.w = level_maps.shape
        flat = level_maps.reshape(s, -1).long().clamp(max=N_LEVELS)  # N_LEVELS: never inked
        self.order = flat.argsort(dim=1, stable=True).to(torch.int32)  # (S, H * W) pixel indices, by level
        per_level = torch.zeros(s, N_LEVELS + 1, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
        self.inked = per_level[:, :N_LEVELS].cumsum(1)  # (S, 17): pixels inked by level L = order[:inked]
        # newest[s, L]: where the pixels first inked at the latest level <= L that added ink start in order
        newest = torch.zeros(s, N_LEVELS, dtype=torch.long)
        for lvl in range(1, N_LEVELS):
            added = self.inked[:, lvl] > self.inked[:, lvl - 1]
            newest[:, lvl] = torch.where(added, self.inked[:, lvl - 1], newest[:, lvl - 1])
        self.newest = newest

    @classmethod
    def from_renders(cls, images: torch.Tensor) -> "InkTable":
        """The table of nested partial renders images (S, 17, H, W) (ink > 0): pixel p is inked at level L
        iff it is inked in render L and every later one, so its first-ink level is 17 minus its count."""
        return cls((N_LEVELS - (images > 0).sum(1, dtype=torch.int16)).to(torch.uint8))

    def __call__(self, rule: str, sketch: torch.Tensor, level: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Locations (N, 2) chosen by `rule` for sketches `sketch` (N,) (rows of the table) at `level` (N,).
        A sketch with no ink at that level gets the centre."""
        if rule not in LOCATORS:
            raise ValueError(f"unknown locator {rule!r}: choose from {LOCATORS} (or 'policy')")
        n = len(sketch)
        if rule == "centre":
            return torch.zeros(n, 2)
        if rule == "random":
            return torch.rand(n, 2, generator=generator) * 2.0 - 1.0
        sketch, level = sketch.long(), level.long().clamp(0, N_LEVELS - 1)
        end = self.inked[sketch, level]
        begin = self.newest[sketch, level] if rule == "newest-ink" else torch.zeros_like(end)
        span = end - begin
        pick = begin + (torch.rand(n, generator=generator, dtype=torch.float64) * span).long().clamp(max=(span - 1).clamp(min=0))
        pixel = self.order[sketch, pick.clamp(max=self.order.shape[1] - 1)].long()
        locations = pixel_to_location(torch.stack([pixel % self.w, pixel // self.w], -1), (self.w, self.h))
        return torch.where((span > 0)[:, None], locations, torch.zeros_like(locations))


def nearest_ink(images: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """The centre of the inked pixel nearest to each location: images (B, H, W) (ink > 0), locations
    (B, 2) -> (B, 2). A location whose image has no ink is returned as it is.

    The environment's `snap_to_ink` sensor: glimpses that land on the sketch whatever the locator
    chose, so a locator can neither park on blank paper nor pin itself to the border.
    """
    b, h, w = images.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = pixel_to_location(torch.stack([cols.reshape(-1), rows.reshape(-1)], -1), (w, h))  # (H * W, 2)
    distance = (centres[None] - locations[:, None].to(torch.float32)).pow(2).sum(-1)  # (B, H * W)
    ink = images.reshape(b, h * w) > 0
    nearest = distance.masked_fill(~ink, float("inf")).argmin(1)
    return torch.where(ink.any(1, keepdim=True), centres[nearest], locations.to(torch.float32))
