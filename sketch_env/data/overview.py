"""What a data set looks like to a person: a text summary (`darp data info`) and a contact sheet of one
sketch's 17 completion levels beside its photo (`darp data show`)."""

from __future__ import annotations

import numpy as np

from sketch_env.data.store import DataError, Dataset
from sketch_env.render import render_levels


def describe(ds: Dataset) -> str:
    """Counts per split, then points, strokes and drawers per sketch, as lines for the terminal."""
    sk, ph = ds.sketches, ds.photos
    lines = [f"{ds.path}: {ds.manifest.get('name')} (source {ds.manifest.get('source')})"]
    lines.append(f"  {'split':<6} {'sketches':>8} {'photos':>7}")
    for split in sorted(set(sk.split) | set(ph.split)):
        lines.append(f"  {split:<6} {int((sk.split == split).sum()):>8} {int((ph.split == split).sum()):>7}")
    lines.append(f"  {'total':<6} {len(sk):>8} {len(ph):>7}")
    if len(sk):
        sketch_of_point = np.repeat(np.arange(len(sk)), sk.lengths())
        strokes = np.bincount(sketch_of_point, weights=sk.points[:, 2], minlength=len(sk))
        for what, v in (("points per sketch", sk.lengths()), ("strokes per sketch", strokes)):
            lines.append(f"  {what}: min {v.min():g}, median {np.median(v):g}, mean {v.mean():.1f}, max {v.max():g}")
        canvases = sorted({(float(w), float(h)) for w, h in zip(sk.canvas_width, sk.canvas_height)})
        canvas_text = ", ".join(f"{w:g}x{h:g}" for w, h in canvases)
        lines.append(f"  drawers: {len(set(sk.drawer.tolist()))}; canvas: {canvas_text}")
    return "\n".join(lines)


def levels_sheet(ds: Dataset, sketch_id: str | None, size: int):
    """A PIL image: the sketch's photo, then its 17 partial renderings (6 to a row, each captioned), with
    the sketch's id, split and drawer on top. `sketch_id` None takes the first sketch; returns
    (image, sketch id, photo id)."""
    from PIL import Image, ImageDraw

    sk = ds.sketches
    if len(sk) == 0:
        raise DataError(f"{ds.path}: the data set has no sketches")
    sketch_id = sketch_id or str(sk.sketch_id[0])
    found = np.flatnonzero(sk.sketch_id == sketch_id)
    if len(found) == 0:
        raise DataError(f"{ds.path}: no sketch with id {sketch_id!r}; ids look like {list(sk.sketch_id[:3])}")
    i = int(found[0])
    photo_id = str(sk.photo_id[i])
    levels = render_levels(sk.subset([i]), size)[0]  # (17, size, size), ink = 1
    photo = ds.photos.decode(ds.photos.index_of()[photo_id], size)

    cols, caption = 6, 16
    tiles = [("photo " + photo_id, Image.fromarray(photo))]
    for lv, level in enumerate(levels):
        tiles.append((f"level {lv} ({lv + 1}/{len(levels)})", Image.fromarray(((1.0 - level) * 255).astype(np.uint8))))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * (size + 4), caption + rows * (size + caption + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 2), f"{sketch_id} ({sk.split[i]}, drawer {sk.drawer[i]}, {len(sk.sketch(i))} points)", fill="black")
    for k, (label, tile) in enumerate(tiles):
        x, y = (k % cols) * (size + 4), caption + (k // cols) * (size + caption + 4)
        draw.text((x + 2, y + 2), label, fill="black")
        sheet.paste(tile.convert("RGB"), (x, y + caption))
        draw.rectangle([x, y + caption, x + size - 1, y + caption + size - 1], outline=(160, 160, 160))
    return sheet, sketch_id, photo_id


__all__ = ["describe", "levels_sheet"]
