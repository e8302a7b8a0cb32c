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

LOCATORS = ("centre", "random", "ink", "newest-ink")


def fixed_locations(
    rule: str, level_maps: torch.Tensor, level: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Locations (B, 2) chosen by `rule` for partial sketches level_maps (B, H, W) uint8 at `level` (B,)."""
    if rule not in LOCATORS:
        raise ValueError(f"unknown locator {rule!r}: choose from {LOCATORS} (or 'policy')")
    b, h, w = level_maps.shape
    if rule == "centre":
        return torch.zeros(b, 2)
    if rule == "random":
        return torch.rand(b, 2, generator=generator) * 2.0 - 1.0
    maps = level_maps.reshape(b, h * w).long()
    inked = maps <= level[:, None]
    if rule == "newest-ink":
        newest = torch.where(inked, maps, torch.full_like(maps, -1)).amax(1, keepdim=True)
        inked = inked & (maps == newest)
    return _uniform_pixel(inked, h, w, generator)


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


def _uniform_pixel(mask: torch.Tensor, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly drawn True pixel of each row of mask (B, H * W) as a location; the centre if none."""
    scores = torch.rand(mask.shape, generator=generator).masked_fill_(~mask, -1.0)
    pick = scores.argmax(1)
    locations = pixel_to_location(torch.stack([pick % w, pick // w], -1), (w, h))
    return torch.where(mask.any(1, keepdim=True), locations, torch.zeros_like(locations))
