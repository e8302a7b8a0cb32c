"""The built-in fine-grained data set: parametric chairs, their photos, and sketches by simulated people.

A fresh machine has no sketches, so the project makes its own FG-SBIR problem. Every instance is one
chair assembled from parts with many parameters (`Chair`): back style (solid, 2-6 slats, 2-5 ladder
rails, rounded, cut-out of five shapes) and top shape, seat shape and proportions, legs (straight,
tapered, splayed, each with or without cross-bars; pedestal with a star base; sled runners), arms
(none, straight, curved, panel), materials and colours, seen in a slight 3/4 view. Most chairs share
the coarse outline (a back above a seat above legs) and differ in details: that makes it fine-grained.

Photo and sketches come from one 3D model (`_build`). The photo fills and shades its faces (painter's
algorithm, wood grain or fabric texture, a blurred floor shadow, optional background clutter). Each
sketch draws strokes derived from the same parts, coarse to fine (back and seat outline; then legs,
seat edge and arms; then details: slats, rails, cut-outs, cross-bars, spokes), as a simulated person
with their own point spacing, smooth wobble, scale / shift / rotation, missed details and scribbles.
Points are spaced like Chair-V2's (about 12 px apart on the 256 canvas, ~100-200 points a sketch).

Every random draw comes from a generator seeded with (seed, instance, stream[, sketch]), so instance
i is the same whatever the number of photos, and one seed always gives byte-identical output.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sketch_env.atomic import check_output_dir
from sketch_env.data.store import DATASET, PhotoSet, SketchSet, encode_png, save_dataset

CANVAS = 256.0  # sketch canvas side in pixels, as in Chair-V2
FIT = 0.80  # the chair's longer side spans this share of the photo (and of an undistorted sketch)

# independent random streams of one instance
_CHAIR, _PHOTO, _SKETCH, _SPLIT = 0, 1, 2, 3
# stroke groups, drawn in this order (a drawer may interleave STRUCTURE and DETAIL a little)
OUTLINE, STRUCTURE, DETAIL, NOISE = 0, 1, 2, 3
# material index of a photo pixel
_BACKGROUND, _FRAME, _SHELL = 0, 1, 2

SEAT_SHAPES = ("rect", "rounded", "round", "trapezoid")
BACK_STYLES = ("solid", "slats", "ladder", "rounded", "cutout")
LEG_STYLES = ("straight", "tapered", "splayed", "pedestal", "sled")
STRETCHERS = ("none", "box", "H", "sides")
ARM_STYLES = ("none", "straight", "curved", "panel")
# cut-out shape -> (superellipse exponent, height / width)
CUTOUTS = {"circle": (2.0, 1.0), "oval": (2.0, 1.5), "rect": (5.0, 1.2), "diamond": (1.0, 1.2), "slot": (4.0, 0.3)}
_THIN = 0.025  # bars thinner than this (half-width, model units) are sketched as one line


@dataclass(frozen=True)
class Chair:
    """All parameters of one chair instance (lengths in model units: a seat is about 1 wide)."""

    yaw: float  # radians, the 3/4 view
    pitch: float  # radians, camera looking down
    seat_shape: str
    seat_m: float  # superellipse exponent of the seat outline (2 round ... 12 square)
    seat_w: float
    seat_d: float
    seat_t: float  # thickness
    seat_h: float  # height of the seat top above the floor
    seat_taper: float  # trapezoid: the front is this much wider than the middle
    back_style: str
    back_h: float
    back_tilt: float  # radians
    back_t: float
    back_w_top: float  # top width / bottom width
    back_cap: float  # height of the curved top
    back_m: float  # superellipse exponent of the top curve (2 rounded ... 10 flat)
    back_gap: float  # rounded backs float this high above the seat on two posts
    n_slats: int
    slat_fill: float  # slat width / slat spacing
    n_rails: int
    post_w: float
    rail_h: float  # height of the top rail of slat and ladder backs
    cutout: str
    cutout_size: float  # width of the cut-out / width of the back
    cutout_u: float  # height of the cut-out centre / back height
    leg_style: str
    leg_w: float
    leg_round: bool
    leg_inset: float
    leg_splay: float
    leg_taper: float
    stretcher: str
    stretcher_h: float  # height of the cross-bars / seat height
    n_spokes: int
    spoke_r: float
    casters: bool
    arms: str
    arm_h: float
    arm_w: float
    frame_kind: str  # wood, metal, painted
    frame_rgb: tuple[float, float, float]
    shell_kind: str  # wood, metal, painted, fabric, plastic
    shell_rgb: tuple[float, float, float]


def sample_chair(rng: np.random.Generator) -> Chair:
    """Draw every parameter of one chair from `rng`."""
    u = rng.uniform
    yaw = math.radians(u(14, 34)) * (1 if u() < 0.75 else -1)
    pitch = math.radians(u(12, 24))
    seat_shape = SEAT_SHAPES[rng.choice(4, p=[0.35, 0.3, 0.15, 0.2])]
    seat_m = {"rect": u(8, 12), "rounded": u(3, 5), "round": u(2, 2.4), "trapezoid": u(5, 9)}[seat_shape]
    back_style = BACK_STYLES[rng.choice(5, p=[0.2, 0.25, 0.2, 0.15, 0.2])]
    top = rng.integers(3)  # flat, soft, arched
    back_m, cap_share = [(u(8, 12), u(0.03, 0.06)), (u(4, 6), u(0.06, 0.12)), (u(2, 3), u(0.12, 0.25))][top]
    back_h = u(0.75, 1.3)
    back_gap = 0.0
    if back_style == "rounded":
        back_m, cap_share, back_gap = u(2, 2.6), u(0.35, 0.5), u(0.08, 0.25)
    leg_style = LEG_STYLES[rng.choice(5, p=[0.25, 0.2, 0.2, 0.2, 0.15])]
    four_legs = leg_style in ("straight", "tapered", "splayed")
    metal_legs = leg_style in ("pedestal", "sled") or u() < 0.25
    frame_kind = ("metal" if u() < 0.6 else "painted") if metal_legs else ("wood" if u() < 0.7 else "painted")
    shell_kind = frame_kind if (u() < 0.45 and not metal_legs) else ("wood", "fabric", "plastic")[rng.integers(3)]
    arms = ARM_STYLES[rng.choice(4, p=[0.5, 0.2, 0.15, 0.15])]
    return Chair(
        yaw=yaw,
        pitch=pitch,
        seat_shape=seat_shape,
        seat_m=seat_m,
        seat_w=u(0.85, 1.2),
        seat_d=u(0.75, 1.05),
        seat_t=u(0.05, 0.18),
        seat_h=u(0.85, 1.15),
        seat_taper=u(0.08, 0.2) if seat_shape == "trapezoid" else 0.0,
        back_style=back_style,
        back_h=back_h,
        back_tilt=math.radians(u(3, 15)),
        back_t=u(0.04, 0.08),
        back_w_top=u(0.85, 1.12),
        back_cap=cap_share * back_h,
        back_m=back_m,
        back_gap=back_gap,
        n_slats=int(rng.integers(2, 7)),
        slat_fill=u(0.25, 0.6),
        n_rails=int(rng.integers(2, 6)),
        post_w=u(0.05, 0.09),
        rail_h=u(0.08, 0.2),
        cutout=list(CUTOUTS)[rng.integers(len(CUTOUTS))],
        cutout_size=u(0.25, 0.5),
        cutout_u=u(0.55, 0.75),
        leg_style=leg_style,
        leg_w=u(0.03, 0.045) if metal_legs else u(0.06, 0.11),
        leg_round=metal_legs,
        leg_inset=u(0.03, 0.12),
        leg_splay=u(0.08, 0.2) if leg_style == "splayed" else 0.0,
        leg_taper=u(0.4, 0.7) if leg_style == "tapered" else 1.0,
        stretcher=STRETCHERS[rng.choice(4, p=[0.45, 0.2, 0.2, 0.15])] if four_legs else "none",
        stretcher_h=u(0.15, 0.45),
        n_spokes=int(rng.integers(4, 6)),
        spoke_r=u(0.45, 0.62),
        casters=bool(u() < 0.5),
        arms=arms,
        arm_h=u(0.2, 0.35),
        arm_w=u(0.08, 0.15) if arms == "panel" else u(0.04, 0.08),
        frame_kind=frame_kind,
        frame_rgb=_colour(frame_kind, rng),
        shell_kind=shell_kind,
        shell_rgb=_colour(shell_kind, rng),
    )


def _colour(kind: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """An RGB colour in [0, 1] typical of a material."""
    u = rng.uniform
    if kind == "wood":
        light, dark = np.array([0.88, 0.76, 0.58]), np.array([0.36, 0.23, 0.15])
        t = u()
        rgb = light * (1 - t) + dark * t + u(-0.03, 0.03, 3)
    elif kind == "metal":
        g = u(0.62, 0.82) if u() < 0.6 else u(0.12, 0.22)
        rgb = np.full(3, g) + u(-0.02, 0.02, 3)
    elif kind == "fabric":
        rgb = np.array(colorsys.hsv_to_rgb(u(), u(0.1, 0.6), u(0.3, 0.85)))
    elif kind == "plastic" and u() < 0.5:
        rgb = np.full(3, u(0.85, 0.95) if u() < 0.5 else u(0.12, 0.2))
    else:  # painted, or coloured plastic
        rgb = np.array(colorsys.hsv_to_rgb(u(), u(0.4, 0.85), u(0.45, 0.9)))
    return tuple(float(v) for v in np.clip(rgb, 0, 1))


# ---------------------------------------------------------------------------------------------
# 3D model: parts (lofts between two vertex loops) for the photo, strokes for the sketches


@dataclass
class _Part:
    """A solid lofted between two vertex loops a, b: (n, 3) each; caps a and b, n side quads."""

    a: np.ndarray
    b: np.ndarray
    mat: int  # _FRAME or _SHELL
    layer: int  # 0 under the seat, 1 the seat, 2 above it (painter's order, then depth)
    hole: np.ndarray | None = None  # (m, 3) loop cut through the front cap (back cut-outs)


class _Camera:
    """Orthographic view turned by `yaw` about the vertical and looking down by `pitch`.

    World: x right, y up, z towards the viewer. Screen: u right, v down (model units).
    """

    def __init__(self, yaw: float, pitch: float):
        self.ca, self.sa, self.cp, self.sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
        self.towards = np.array([-self.sa * self.cp, self.sp, self.ca * self.cp])  # unit vector to the viewer

    def project(self, p: np.ndarray) -> np.ndarray:
        """(..., 3) world points -> (..., 2) screen points."""
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        zr = -x * self.sa + z * self.ca
        return np.stack([x * self.ca + z * self.sa, -y * self.cp + zr * self.sp], axis=-1)


def _superellipse(a: float, b: float, m: float, n: int) -> np.ndarray:
    """(n, 2) points of |x/a|^m + |y/b|^m = 1, counter-clockwise from angle 0 (m=2 ellipse, 1 diamond)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    return np.stack([a * np.sign(c) * np.abs(c) ** (2 / m), b * np.sign(s) * np.abs(s) ** (2 / m)], 1)


def _bar(p0, p1, w0: float, w1: float, mat: int, layer: int, sides: int = 4, depth: float | None = None) -> _Part:
    """A straight bar from p0 to p1, half-width w0 at p0 and w1 at p1 (square or, sides=8, round).

    `depth`: half-size along the second cross axis when it differs from the width (flat boards).
    """
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = (p1 - p0) / max(np.linalg.norm(p1 - p0), 1e-9)
    hint = np.eye(3)[np.argmin(np.abs(d))]  # the world axis least along the bar
    e1 = hint - (hint @ d) * d
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d, e1)
    t = (np.arange(sides) + 0.5) * 2 * np.pi / sides
    r = math.sqrt(2) if sides == 4 else 1.0
    k = depth / w0 if depth is not None else 1.0
    ring = r * (np.cos(t)[:, None] * e1 + k * np.sin(t)[:, None] * e2)
    return _Part(p0 + w0 * ring, p1 + w1 * ring, mat, layer)


def _bar_stroke(cam: _Camera, p0, p1, w0: float, w1: float, closed: bool) -> np.ndarray:
    """A bar as drawn: one line if thin, else its two sides (joined at p1; a loop if `closed`)."""
    a, b = cam.project(np.asarray(p0, float)), cam.project(np.asarray(p1, float))
    if w0 < _THIN:
        return np.stack([a, b])
    d = (b - a) / max(np.linalg.norm(b - a), 1e-9)
    n = np.array([-d[1], d[0]])
    pts = [a + n * w0, b + n * w1, b - n * w1, a - n * w0]
    return np.stack(pts + pts[:1] if closed else pts)


def _path_stroke(cam: _Camera, pts3d: np.ndarray, closed: bool = False) -> np.ndarray:
    """A 3D polyline as drawn: projected, closed by repeating its first point if `closed`."""
    p = cam.project(np.asarray(pts3d, float))
    return np.concatenate([p, p[:1]]) if closed else p


def _build(c: Chair) -> tuple[list[_Part], list[tuple[np.ndarray, int]], _Camera, np.ndarray]:
    """The chair's parts (3D), strokes ((n, 2) screen polylines in model units, group), camera,
    and (k, 3) points where it stands on the floor (for the shadow)."""
    cam = _Camera(c.yaw, c.pitch)
    parts: list[_Part] = []
    strokes: list[tuple[np.ndarray, int]] = []
    hs, ht = c.seat_h, c.seat_h - c.seat_t

    # seat: a superellipse slab (the bottom slightly smaller, like a bevel)
    sx, sz = c.seat_w / 2, c.seat_d / 2
    outline = _superellipse(sx, sz, c.seat_m, 40)
    outline[:, 0] *= 1 + c.seat_taper * outline[:, 1] / sz
    top = np.stack([outline[:, 0], np.full(40, hs), outline[:, 1]], 1)
    bottom = np.stack([0.96 * outline[:, 0], np.full(40, ht), 0.96 * outline[:, 1]], 1)
    parts.append(_Part(top, bottom, _SHELL, 1))
    strokes.append((_path_stroke(cam, top, closed=True), OUTLINE))
    strokes.append((_seat_edge(cam, top, bottom), STRUCTURE))

    _build_back(c, cam, parts, strokes)
    feet = _build_legs(c, cam, parts, strokes, ht)
    _build_arms(c, cam, parts, strokes, hs, ht)
    return parts, strokes, cam, feet


def _seat_edge(cam: _Camera, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """The visible front rim of the seat: down one side, along the bottom edge, up the other."""
    n = len(top)
    j = (np.arange(n) + 1) % n
    normal = np.cross(bottom - top, top[j] - top)  # side quad i spans vertices i and i + 1
    centre = top.mean(0)
    outward = np.einsum("ij,ij->i", normal, (top + top[j]) / 2 - centre) > 0
    normal[~outward] *= -1
    visible = normal @ cam.towards > 0
    start = int(np.flatnonzero(visible & ~np.roll(visible, 1))[0])
    run = np.roll(visible, -start)
    length = int(np.argmin(run)) if not run.all() else n
    idx = (start + np.arange(length + 1)) % n
    pts = np.concatenate([top[idx[:1]], bottom[idx], top[idx[-1:]]])
    return cam.project(pts)


def _build_back(c: Chair, cam: _Camera, parts: list, strokes: list) -> None:
    """Back panel or frame on the rear edge of the seat, in its own tilted plane (x, u)."""
    ct, st = math.cos(c.back_tilt), math.sin(c.back_tilt)
    zb = -c.seat_d / 2 + c.back_t
    normal = np.array([0.0, st, ct])  # towards the front of the back

    def plane(xu: np.ndarray, behind: float = 0.0) -> np.ndarray:
        xu = np.asarray(xu, float).reshape(-1, 2)
        p = np.stack([xu[:, 0], c.seat_h + xu[:, 1] * ct, zb - xu[:, 1] * st], 1)
        return p - behind * normal

    def panel(xu: np.ndarray, mat: int, thick: float, hole=None) -> _Part:
        return _Part(plane(xu), plane(xu, thick), mat, 2, None if hole is None else plane(hole))

    wb = c.seat_w * (0.78 if c.seat_shape == "round" else 0.92)
    wt = wb * c.back_w_top
    side = c.back_h - c.back_cap  # height where the top curve starts
    t = np.linspace(-1, 1, 17)
    curve = np.stack([t * wt / 2, side + c.back_cap * (1 - np.abs(t) ** c.back_m) ** (1 / c.back_m)], 1)
    u0 = c.back_gap
    outline = np.concatenate([[[-wb / 2, u0]], curve, [[wb / 2, u0]]])

    def half_width(u):  # half-width of the back at height u (straight sides)
        return (wb + (wt - wb) * (u - u0) / (side - u0)) / 2

    if c.back_style in ("solid", "cutout", "rounded"):
        hole = None
        if c.back_style == "cutout":
            m, aspect = CUTOUTS[c.cutout]
            a = c.cutout_size * wt / 2
            b = min(a * aspect, 0.3 * side)
            hole = _superellipse(a, b, m, 24) + [0.0, c.cutout_u * side]
            strokes.append((_path_stroke(cam, plane(hole), closed=True), DETAIL))
        parts.append(panel(outline, _SHELL, c.back_t, hole))
        strokes.append((_path_stroke(cam, plane(outline), closed=u0 > 0), OUTLINE))
        if u0 > 0:  # two short posts hold the floating back
            for x in (-0.3 * wb, 0.3 * wb):
                p0, p1 = plane([x, -0.02], c.back_t / 2)[0], plane([x, u0 + 0.05], c.back_t / 2)[0]
                parts.append(_bar(p0, p1, c.post_w / 2, c.post_w / 2, _FRAME, 2))
                strokes.append((_bar_stroke(cam, p0, p1, c.post_w / 2, c.post_w / 2, False), STRUCTURE))
        return

    # frame backs: two posts, a shaped top rail, and slats or ladder rails between the posts
    strokes.append((_path_stroke(cam, plane(outline)), OUTLINE))
    ur = side - c.rail_h  # bottom of the top rail
    pw = c.post_w
    for s in (-1, 1):
        post = [[s * (wb / 2 - pw / 2), 0.0], [s * (half_width(ur) - pw / 2), ur]]
        p0, p1 = plane(post, c.back_t / 2)
        parts.append(_bar(p0, p1, pw / 2, pw / 2, _FRAME, 2, depth=c.back_t / 2))
    rail = np.concatenate([[[-half_width(ur), ur]], curve, [[half_width(ur), ur]]])
    parts.append(panel(rail, _FRAME, c.back_t))

    def inner(u):  # half-width between the posts at height u
        return half_width(u) - pw

    def quad(x0f: float, x1f: float, ua: float, ub: float) -> np.ndarray:
        """Corners of a piece spanning fractions x0f..x1f of the inner width between heights ua..ub."""
        xa, xb = inner(ua), inner(ub)
        return np.array(
            [[xa * (2 * x0f - 1), ua], [xb * (2 * x0f - 1), ub], [xb * (2 * x1f - 1), ub], [xa * (2 * x1f - 1), ua]]
        )

    if c.back_style == "slats":
        ub = 0.06 + 0.06 * c.slat_fill  # top of the bottom rail
        pieces = [quad(0, 1, 0.0, ub)]
        for k in range(c.n_slats):
            centre, half = (k + 0.5) / c.n_slats, c.slat_fill / (2 * c.n_slats)
            pieces.append(quad(centre - half, centre + half, ub, ur))
        frame_inner = np.array([[-inner(ub), ub], [-inner(ur), ur], [inner(ur), ur], [inner(ub), ub]])
        strokes.append((_path_stroke(cam, plane(frame_inner), closed=True), DETAIL))
    else:  # ladder
        heights = np.linspace(0.15 * ur, ur - 0.22 * ur, c.n_rails)
        rh = 0.4 * c.rail_h
        pieces = [quad(0, 1, h - rh / 2, h + rh / 2) for h in heights]
        for s in (-1, 1):  # inner edges of the posts
            strokes.append((_path_stroke(cam, plane([[s * inner(0), 0.0], [s * inner(ur), ur]])), DETAIL))
    for q in pieces:
        parts.append(panel(q, _FRAME, 0.8 * c.back_t))
        strokes.append((_path_stroke(cam, plane(q), closed=True), DETAIL))


def _build_legs(c: Chair, cam: _Camera, parts: list, strokes: list, ht: float) -> np.ndarray:
    """Legs, cross-bars, pedestal or runners under the seat. Returns (k, 3) floor contact points."""
    sx, sz = c.seat_w / 2, c.seat_d / 2
    if c.leg_style == "pedestal":
        base_y, col = 0.12, max(c.leg_w, 0.05)
        p0, p1 = [0, ht, 0], [0, base_y, 0]
        parts.append(_bar(p0, p1, col, col, _FRAME, 0, sides=8))
        strokes.append((_bar_stroke(cam, p0, p1, col, col, False), STRUCTURE))
        r = c.spoke_r * c.seat_w
        angles = np.pi / 2 + c.yaw + np.arange(c.n_spokes) * 2 * np.pi / c.n_spokes
        lift = 0.05 if c.casters else 0.0
        ends = np.stack([r * np.cos(angles), np.full(c.n_spokes, lift), r * np.sin(angles)], 1)
        for e in ends:
            parts.append(_bar([0, base_y, 0], e, 0.035, 0.025, _FRAME, 0))
            strokes.append((_bar_stroke(cam, [0, base_y, 0], e, 0.035, 0.025, False), DETAIL))
            if c.casters:
                foot = e - [0, lift, 0]
                parts.append(_bar(e, foot, 0.03, 0.03, _FRAME, 0, sides=8))
                strokes.append((_bar_stroke(cam, e, foot, 0.03, 0.03, True), DETAIL))
        return ends * [1, 0, 1]

    if c.leg_style == "sled":
        xr, zf = sx - c.leg_inset, sz - c.leg_inset
        corner = 0.08
        path_zy = np.array(
            [[zf, ht], [zf + 0.06, corner], [zf, 0.0], [-zf, 0.0], [-zf - 0.06, corner], [-zf + 0.02, ht]]
        )
        feet = []
        for s in (-1, 1):
            path = np.stack([np.full(len(path_zy), s * xr), path_zy[:, 1] + c.leg_w, path_zy[:, 0]], 1)
            for a, b in zip(path[:-1], path[1:]):
                parts.append(_bar(a, b, c.leg_w, c.leg_w, _FRAME, 0, sides=8))
            strokes.append((_path_stroke(cam, path), STRUCTURE))
            feet += [path[2], path[3]]
        return np.array(feet) * [1, 0, 1]

    # four legs under the corners of the seat outline
    k = 0.7071 ** (2 / c.seat_m)
    cx, cz = sx * k - c.leg_inset, sz * k - c.leg_inset
    tops, foots = [], []
    for zs in (-1, 1):  # back-left, back-right, front-left, front-right
        for xs in (-1, 1):
            x = xs * cx * (1 + c.seat_taper * zs * k)
            top = np.array([x, ht, zs * cz])
            foot = np.array([x + xs * c.leg_splay, 0.0, zs * (cz + 0.8 * c.leg_splay)])
            w0, w1 = c.leg_w / 2, c.leg_w / 2 * c.leg_taper
            parts.append(_bar(top, foot, w0, w1, _FRAME, 0, sides=8 if c.leg_round else 4))
            strokes.append((_bar_stroke(cam, top, foot, w0, w1, False), STRUCTURE))
            tops.append(top)
            foots.append(foot)
    if c.stretcher != "none":
        y = c.stretcher_h * ht
        at = [f + (t - f) * (y / ht) for t, f in zip(tops, foots)]  # on each leg's axis at height y
        pairs = {"box": [(2, 3), (0, 1), (0, 2), (1, 3)], "H": [(0, 2), (1, 3)], "sides": [(0, 2), (1, 3)]}[c.stretcher]
        ends = [(at[i], at[j]) for i, j in pairs]
        if c.stretcher == "H":
            ends.append(((at[0] + at[2]) / 2, (at[1] + at[3]) / 2))
        w = 0.3 * c.leg_w
        for a, b in ends:
            d = (b - a) / np.linalg.norm(b - a)
            a, b = a + d * c.leg_w / 2, b - d * c.leg_w / 2  # stop at the legs' surfaces
            parts.append(_bar(a, b, w, w, _FRAME, 0, sides=8 if c.leg_round else 4))
            strokes.append((_bar_stroke(cam, a, b, w, w, True), DETAIL))
    return np.array(foots)


def _build_arms(c: Chair, cam: _Camera, parts: list, strokes: list, hs: float, ht: float) -> None:
    """Armrests on both sides: a board on a front support, a bent tube, or an upholstered block."""
    if c.arms == "none":
        return
    zb, zf = -c.seat_d / 2 + c.back_t, c.seat_d / 2 - 0.08
    for s in (-1, 1):
        if c.arms == "panel":  # an upholstered side block from under the seat to the armrest
            x0, x1 = s * c.seat_w / 2, s * (c.seat_w / 2 + c.arm_w)
            top, front = hs + c.arm_h, zf + 0.06
            back = -c.seat_d / 2
            zy = np.array([[back, ht - 0.05], [back, top], [zf, top], [front, top - 0.06], [front, ht - 0.05]])
            outer, inner = (np.stack([np.full(len(zy), x), zy[:, 1], zy[:, 0]], 1) for x in (x1, x0))
            parts.append(_Part(outer, inner, _SHELL, 2))
            strokes.append((_path_stroke(cam, outer, closed=True), STRUCTURE))
            continue
        x = s * (c.seat_w / 2 - c.arm_w / 2)
        if c.arms == "straight":
            rest0, rest1 = np.array([x, hs + c.arm_h, zb]), np.array([x, hs + c.arm_h, zf + 0.05])
            parts.append(_bar(rest0, rest1, c.arm_w / 2, c.arm_w / 2, _FRAME, 2, depth=0.02))
            strokes.append((_bar_stroke(cam, rest0, rest1, c.arm_w / 2, c.arm_w / 2, True), STRUCTURE))
            sup0, sup1 = np.array([x, hs, zf]), np.array([x, hs + c.arm_h - 0.02, zf])
            parts.append(_bar(sup0, sup1, 0.025, 0.025, _FRAME, 2))
            strokes.append((_bar_stroke(cam, sup0, sup1, 0.025, 0.025, False), DETAIL))
        else:  # curved: level from the back, then sweeping down to the front of the seat
            rz = min(c.arm_h, (zf - zb) * 0.6)
            t = np.linspace(np.pi / 2, 0, 6)
            sweep = np.stack([zf - rz + rz * np.cos(t), hs + c.arm_h * np.sin(t)], 1)
            zy = np.concatenate([[[zb, hs + c.arm_h]], sweep])
            path = np.stack([np.full(len(zy), x), zy[:, 1], zy[:, 0]], 1)
            for a, b in zip(path[:-1], path[1:]):
                parts.append(_bar(a, b, 0.03, 0.03, _FRAME, 2, sides=8))
            strokes.append((_path_stroke(cam, path), STRUCTURE))


# ---------------------------------------------------------------------------------------------
# photo


def _fit(points: np.ndarray) -> tuple[float, np.ndarray]:
    """Scale and offset that centre (n, 2) screen points in the unit square, longer side = FIT."""
    lo, hi = points.min(0), points.max(0)
    scale = FIT / float((hi - lo).max())
    return scale, 0.5 - scale * (lo + hi) / 2


def _faces(parts: list[_Part], cam: _Camera):
    """Visible faces of all parts in painter's order (layer, then part depth, then face depth).

    Returns polygons (list of (k, 3)), outward unit normals (F, 3) and owning part index (F,).
    Faces of one part stay together, so a part's cut-out can be punched right after it.
    """
    sizes = np.array([len(p.a) for p in parts])
    starts = np.cumsum(sizes) - sizes
    a, b = np.concatenate([p.a for p in parts]), np.concatenate([p.b for p in parts])
    pid = np.repeat(np.arange(len(parts)), sizes)
    nxt = starts[pid] + (np.arange(len(a)) - starts[pid] + 1) % sizes[pid]
    quads = np.stack([a, a[nxt], b[nxt], b], 1)  # (N, 4, 3): side quad of vertex i and i + 1
    centre_a = np.add.reduceat(a, starts) / sizes[:, None]
    centre_b = np.add.reduceat(b, starts) / sizes[:, None]
    normals = np.concatenate(
        [
            np.add.reduceat(np.cross(a, a[nxt]), starts),  # area vectors of the caps
            np.add.reduceat(np.cross(b, b[nxt]), starts),
            np.cross(quads[:, 2] - quads[:, 0], quads[:, 3] - quads[:, 1]),
        ]
    )
    centroids = np.concatenate([centre_a, centre_b, quads.mean(1)])
    owner = np.concatenate([np.arange(len(parts)), np.arange(len(parts)), pid])
    centre = (centre_a + centre_b) / 2
    normals[np.einsum("ij,ij->i", normals, centroids - centre[owner]) < 0] *= -1
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    layer = np.array([p.layer for p in parts])
    order = np.lexsort((centroids @ cam.towards, owner, (centre @ cam.towards)[owner], layer[owner]))
    order = order[normals[order] @ cam.towards > 1e-6]
    n_parts = len(parts)
    polys = [
        parts[k].a if k < n_parts else parts[k - n_parts].b if k < 2 * n_parts else quads[k - 2 * n_parts]
        for k in order
    ]
    return polys, normals[order], owner[order]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A studio backdrop (light, soft gradient) or, sometimes, a room corner with a few objects."""
    u = rng.uniform
    ramp = np.linspace(1, 0.9, size, dtype=np.float32)[:, None, None]  # a little darker downwards
    if u() < 0.7:
        tone = 255 * np.clip(u(0.88, 1.0) + u(-0.02, 0.02, 3), 0, 1).astype(np.float32)
        return Image.fromarray(np.broadcast_to(ramp * tone, (size, size, 3)).astype(np.uint8, order="C"))
    wall = 255 * np.array(colorsys.hsv_to_rgb(u(), u(0.05, 0.25), u(0.75, 0.95)), np.float32)
    floor = 255 * np.array(colorsys.hsv_to_rgb(u(0.05, 0.12), u(0.2, 0.5), u(0.45, 0.75)), np.float32)
    horizon = int(size * u(0.45, 0.7))
    bg = np.concatenate(
        [
            np.broadcast_to(ramp[:horizon] * wall, (horizon, size, 3)),
            np.broadcast_to(ramp[horizon:] * floor, (size - horizon, size, 3)),
        ]
    )
    im = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):
        x = u(0, 0.85) * size
        shade = tuple(int(v) for v in rng.integers(40, 220, 3))
        if u() < 0.5:  # a picture on the wall
            w, h, y = u(0.1, 0.25) * size, u(0.08, 0.2) * size, u(0.05, 0.2) * size
            draw.rectangle([x, y, x + w, y + h], fill=shade, outline=(60, 45, 35), width=max(1, size // 100))
        else:  # a pot with a plant on the floor
            w, y = u(0.06, 0.12) * size, horizon + u(0.05, 0.2) * size
            draw.polygon([(x, y), (x + w, y), (x + 0.85 * w, y + w), (x + 0.15 * w, y + w)], fill=shade)
            for _ in range(5):
                cx, cy, r = x + u(0, w), y - u(0, 1.2) * w, u(0.2, 0.45) * w
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(int(u(30, 80)), int(u(90, 150)), int(u(30, 70))))
    return im


def _texture(kind: str, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float32 multiplicative texture of a material, about 1; noise: (size, size) N(0, 1)."""
    size = len(noise)
    if kind == "wood":  # grain: bent stripes along a random axis
        t = np.linspace(0, 1, size, dtype=np.float32)
        along, across = (t[None, :], t[:, None]) if rng.uniform() < 0.5 else (t[:, None], t[None, :])
        bend = sum(rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * (f * across + rng.uniform())) for f in (1.3, 2.9, 6.1))
        grain = np.sin(2 * np.pi * rng.uniform(25, 50) * (along + bend + 0.01 * noise))
        return 1 + 0.05 * grain + 0.02 * noise
    if kind == "fabric":
        t = np.sin(np.arange(size, dtype=np.float32) * (2 * np.pi / 3))
        return 1 + 0.04 * t[None, :] * t[:, None] + 0.04 * noise
    return 1 + 0.012 * noise


def _render_photo(
    c: Chair, parts: list[_Part], cam: _Camera, feet: np.ndarray, fit: tuple[float, np.ndarray], rng, size: int
) -> np.ndarray:
    """The photo of a chair: (size, size, 3) uint8.

    The chair is drawn at twice the size on black, with a material map beside it; both are halved
    (anti-aliased edges, premultiplied colour) and laid over the backdrop with its floor shadow.
    """
    scale, offset = fit
    big = 2 * size

    def to_px(p3: np.ndarray, px: float) -> np.ndarray:
        return (cam.project(p3) * scale + offset) * px

    small = max(size // 4, 8)  # the shadow is blurred anyway: draw it small
    shadow = Image.new("L", (small, small), 0)
    sd = ImageDraw.Draw(shadow)
    sd.polygon(to_px(parts[0].a * [1.1, 0, 1.1], small).ravel().tolist(), fill=int(rng.uniform(110, 170)))
    r = 0.03 * small
    for x, y in to_px(feet, small):
        sd.ellipse([x - 1.5 * r, y - r, x + 1.5 * r, y + r], fill=230)
    shadow = shadow.filter(ImageFilter.GaussianBlur(small * 0.025)).resize((size, size), Image.BILINEAR)
    ground = np.asarray(_background(rng, size), np.float32)
    ground *= 1 - (0.45 / 255) * np.asarray(shadow, np.float32)[..., None]

    polys, normals, owner = _faces(parts, cam)
    light = np.array([rng.uniform(-0.7, 0.2), 1.0, rng.uniform(0.4, 0.9)])
    light /= np.linalg.norm(light)
    half = (light + cam.towards) / np.linalg.norm(light + cam.towards)
    ambient = rng.uniform(0.45, 0.6)
    mat = np.array([p.mat for p in parts])[owner]
    base = np.where((mat == _FRAME)[:, None], c.frame_rgb, c.shell_rgb)
    glossy = ("metal", "painted", "plastic")
    shiny = np.where(mat == _FRAME, c.frame_kind in glossy, c.shell_kind in glossy)
    lit = ambient + (1 - ambient) * np.maximum(normals @ light, 0)
    colour = base * lit[:, None] + (shiny * 0.35 * np.maximum(normals @ half, 0) ** 24)[:, None]
    fills = [tuple(v) for v in (np.clip(colour, 0, 1) * 255).astype(np.uint8).tolist()]
    flat = to_px(np.concatenate(polys), big).ravel().tolist()
    ends = 2 * np.cumsum([len(p) for p in polys])
    last_of = {int(k): i for i, k in enumerate(owner)}  # position of each part's last face

    img, matmap = Image.new("RGB", (big, big)), Image.new("L", (big, big), _BACKGROUND)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(matmap)
    for i, (start, end, fill, m) in enumerate(zip(np.r_[0, ends[:-1]].tolist(), ends.tolist(), fills, mat.tolist())):
        draw.polygon(flat[start:end], fill=fill)
        mdraw.polygon(flat[start:end], fill=m)
        hole = parts[owner[i]].hole
        if hole is not None and last_of[int(owner[i])] == i:
            cut = to_px(hole, big).ravel().tolist()
            draw.polygon(cut, fill=(0, 0, 0))
            mdraw.polygon(cut, fill=_BACKGROUND)

    coverage = matmap.point([0] + [255] * 255).reduce(2)  # share of each pixel the chair covers
    alpha = np.asarray(coverage, np.float32)[..., None] / 255
    matmap = np.asarray(matmap)
    noise = rng.standard_normal((size, size)).astype(np.float32)
    textures = np.stack([np.ones_like(noise), _texture(c.frame_kind, noise, rng), _texture(c.shell_kind, noise.T, rng)])
    factor = np.take_along_axis(textures, matmap[None, ::2, ::2].astype(np.intp), 0)[0]
    photo = ground * (1 - alpha) + np.asarray(img.reduce(2), np.float32) * factor[..., None]
    return np.clip(photo, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# sketches


@dataclass(frozen=True)
class _Drawer:
    """How one simulated person draws (all lengths in units of the canvas side)."""

    spacing: float  # distance between recorded points (Chair-V2: about 12 px of 256)
    wobble: float  # amplitude of the smooth wobble along a stroke
    wavelengths: np.ndarray  # (3,) of the wobble's components
    tremor: float  # per-point noise
    misplace: float  # per-stroke offset
    scale: float
    aspect: float
    angle: float  # radians
    shift: np.ndarray  # (2,)
    miss: float  # probability of leaving out a detail stroke (structure strokes: a quarter of it)
    scribbles: float  # expected number of noise strokes
    mix: float  # how much structure and detail strokes interleave


def _sample_drawer(rng: np.random.Generator) -> _Drawer:
    u = rng.uniform
    return _Drawer(
        spacing=u(0.046, 0.052),
        wobble=u(0.002, 0.008),
        wavelengths=np.array([0.08, 0.25, 0.7]) * u(0.7, 1.4),
        tremor=u(0.0005, 0.002),
        misplace=u(0.002, 0.01),
        scale=u(0.86, 1.0),
        aspect=u(0.94, 1.06),
        angle=math.radians(float(np.clip(rng.normal(0, 2.5), -6, 6))),
        shift=u(-0.04, 0.04, 2),
        miss=u(0.0, 0.45),
        scribbles=u(0.0, 0.8),
        mix=u(0.2, 1.6),
    )


def _resample(strokes: list[np.ndarray], spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evenly spaced points along every stroke, all strokes at once.

    strokes: list of (n_k, 2) polylines. Returns points (P, 2), stroke index (P,), arc length (P,).
    Each stroke keeps its ends and gets max(2, round(length / spacing) + 1) points.
    """
    lengths = np.array([len(s) for s in strokes])
    v = np.concatenate(strokes)
    sid = np.repeat(np.arange(len(strokes)), lengths)
    seg = np.linalg.norm(np.diff(v, axis=0), axis=1)
    seg[sid[1:] != sid[:-1]] = 0
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    first = np.cumsum(lengths) - lengths
    arc -= arc[first][sid]
    total = arc[first + lengths - 1]
    keep = np.concatenate([[True], (seg > 1e-9) | (sid[1:] != sid[:-1])])  # interp needs increasing keys
    span = total.max() + 1.0
    key = arc[keep] + sid[keep] * span

    n = np.maximum(2, np.rint(total / spacing).astype(np.int64) + 1)
    out_sid = np.repeat(np.arange(len(strokes)), n)
    step = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    out_arc = step / (n - 1)[out_sid] * total[out_sid]
    query = out_arc + out_sid * span
    pts = np.stack([np.interp(query, key, v[keep, 0]), np.interp(query, key, v[keep, 1])], 1)
    return pts, out_sid, out_arc


def _scribble(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A short noise stroke: a few random steps starting somewhere inside the box lo..hi."""
    start = lo + rng.uniform(0, 1, 2) * (hi - lo)
    steps = rng.normal(0, 0.04, (int(rng.integers(2, 6)), 2))
    return start + np.concatenate([[[0.0, 0.0]], np.cumsum(steps, 0)])


def _draw_sketch(strokes: list[tuple[np.ndarray, int]], rng: np.random.Generator) -> np.ndarray:
    """One simulated person's sketch of a chair: (P, 3) float32 of x, y in [0, 1] and pen flags.

    strokes: (polyline (n, 2) on the unit canvas, group) derived from the chair's parts.
    """
    d = _sample_drawer(rng)
    keep_p = {OUTLINE: 1.0, STRUCTURE: 1 - d.miss / 4, DETAIL: 1 - d.miss}
    drawn = [(p, g) for p, g in strokes if rng.uniform() < keep_p[g]]
    every = np.concatenate([p for p, _ in strokes])
    lo, hi = every.min(0), every.max(0)
    drawn += [(_scribble(rng, lo, hi), NOISE) for _ in range(rng.poisson(d.scribbles))]

    keys = []
    for _, g in drawn:
        if g == OUTLINE:
            keys.append(rng.uniform(0, 0.5))
        elif g == NOISE:
            keys.append(rng.uniform(0.5, 3.0))
        else:
            keys.append(g + rng.uniform(0, d.mix))
    polylines = []
    for k in np.argsort(keys, kind="stable"):
        p = drawn[k][0]
        closed = len(p) > 3 and bool((p[0] == p[-1]).all())
        if closed:  # start anywhere on a loop
            p = np.roll(p[:-1], -int(rng.integers(len(p) - 1)), axis=0)
            p = np.concatenate([p, p[:1]])
        if rng.uniform() < (0.5 if closed else 0.25):
            p = p[::-1]
        polylines.append(p + rng.normal(0, d.misplace, 2))

    pts, sid, arc = _resample(polylines, d.spacing)
    phase = rng.uniform(0, 2 * np.pi, (len(polylines), 3, 2))
    amp = d.wobble * np.array([0.15, 0.4, 1.0])
    waves = np.sin(2 * np.pi * arc[:, None, None] / d.wavelengths[None, :, None] + phase[sid])  # (P, 3, 2)
    pts = pts + np.einsum("f,pfc->pc", amp, waves) + rng.normal(0, d.tremor, pts.shape)

    ca, sa = math.cos(d.angle), math.sin(d.angle)
    linear = np.array([[ca, -sa], [sa, ca]]) @ np.diag([d.scale * d.aspect, d.scale / d.aspect])
    pts = np.clip((pts - 0.5) @ linear.T + 0.5 + d.shift, 0.0, 1.0)
    pen = np.zeros(len(pts), np.float32)
    pen[np.flatnonzero(np.diff(sid))] = 1
    pen[-1] = 1
    return np.concatenate([pts, pen[:, None]], 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the data set


def chair_instance(
    seed: int, index: int, sketches_per_photo: int = 3, photo_size: int = 256
) -> tuple[Chair, np.ndarray, list[np.ndarray]]:
    """Instance `index` of seed `seed`: its parameters, photo (photo_size, photo_size, 3) uint8 and
    `sketches_per_photo` sketches, each (P, 3) float32 of x, y in [0, 1] and pen flags."""
    chair = sample_chair(np.random.default_rng([seed, index, _CHAIR]))
    parts, strokes, cam, feet = _build(chair)
    fit = _fit(cam.project(np.concatenate([np.concatenate([p.a, p.b]) for p in parts])))
    photo = _render_photo(chair, parts, cam, feet, fit, np.random.default_rng([seed, index, _PHOTO]), photo_size)
    unit = [(p * fit[0] + fit[1], g) for p, g in strokes]
    sketches = [_draw_sketch(unit, np.random.default_rng([seed, index, _SKETCH, k])) for k in range(sketches_per_photo)]
    return chair, photo, sketches


def _test_photos(seed: int, n_photos: int, test_fraction: float) -> np.ndarray:
    """Boolean (n_photos,): the round(test_fraction * n) instances with the smallest per-instance key."""
    keys = np.array([np.random.default_rng([seed, i, _SPLIT]).uniform() for i in range(n_photos)])
    test = np.zeros(n_photos, bool)
    test[np.argsort(keys, kind="stable")[: int(round(test_fraction * n_photos))]] = True
    return test


def generate_chairs(
    n_photos: int = 400, sketches_per_photo: int = 3, seed: int = 0, test_fraction: float = 0.25, photo_size: int = 256
) -> tuple[SketchSet, PhotoSet]:
    """The built-in fine-grained data set in memory: (sketches, photos).

    n_photos: number of chair instances; photo i is "chair0000"-style id f"chair{i:04d}".
    sketches_per_photo: K; sketch k (1..K) of photo i is f"chair{i:04d}_{k}", drawn by drawer k - 1,
        on a 256 x 256 canvas (points normalised to [0, 1]^2).
    seed: non-negative; the same seed gives byte-identical output, instance i does not depend on n_photos.
    test_fraction: share of the photos that go, with all their sketches, to split "test" (rest "train").
    photo_size: side of the square RGB photos, stored as PNG.
    """
    if n_photos < 1 or sketches_per_photo < 1:
        raise ValueError(f"need at least one photo and one sketch per photo, got {n_photos} and {sketches_per_photo}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if photo_size < 32:
        raise ValueError(f"photo_size must be at least 32 pixels, got {photo_size}")
    test = _test_photos(seed, n_photos, test_fraction)
    photo_ids, photo_split, images = [], [], []
    sketches, sketch_ids, sketch_photo, sketch_split, drawers = [], [], [], [], []
    for i in range(n_photos):
        _, photo, drawn = chair_instance(seed, i, sketches_per_photo, photo_size)
        pid, split = f"chair{i:04d}", "test" if test[i] else "train"
        photo_ids.append(pid)
        photo_split.append(split)
        images.append(encode_png(photo))
        for k, points in enumerate(drawn):
            sketches.append(points)
            sketch_ids.append(f"{pid}_{k + 1}")
            sketch_photo.append(pid)
            sketch_split.append(split)
            drawers.append(k)
    canvas = np.full(len(sketches), CANVAS, np.float32)
    sketch_set = SketchSet.from_list(sketches, sketch_ids, sketch_photo, sketch_split, drawers, canvas, canvas)
    photo_set = PhotoSet(np.asarray(photo_ids, dtype=object), np.asarray(photo_split, dtype=object), images)
    return sketch_set, photo_set


def generate_dataset(
    out: str | Path,
    n_photos: int = 400,
    sketches_per_photo: int = 3,
    seed: int = 0,
    test_fraction: float = 0.25,
    force: bool = False,
) -> Path:
    """Generate the built-in data set and write it as a data-set directory (atomically). Returns `out`.

    `out` may be new, empty or an earlier data set; anything else only with `force` (see
    `sketch_env.atomic.check_output_dir`), checked before the data is generated.
    """
    check_output_dir(out, DATASET, force=force, replace=True)
    sketches, photos = generate_chairs(n_photos, sketches_per_photo, seed, test_fraction)
    return save_dataset(out, sketches, photos, name="builtin-chairs", source=f"darp data generate seed={seed}", force=force)
