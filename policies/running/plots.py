"""Figures shared by evaluate, demo and report: percentile curves, glimpse overlays, result tables.

One of each: `plot_curves` (any number of models), `plot_glimpses`, `format_table` (one row per model)
and `format_percentiles` (a curve at a few completion levels, one line).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sketch_env.atomic import atomic_write
from sketch_env.geometry import location_to_pixel

TABLE_KEYS = ("auir", "acc@1", "acc@5", "acc@10", "m_at_a")
TABLE_HEAD = ("AUIR", "acc@1", "acc@5", "acc@10", "m@A")


def _save(fig, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = atomic_write(out, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[float]], out: str | Path, title: str = "") -> Path:
    """Ranking percentile (x100) vs completion level, one line per model (the paper's Fig. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        curve = np.asarray(curve, float)
        x = np.linspace(100 / len(curve), 100, len(curve))
        ax.plot(x, curve, marker="o", ms=3, label=name)
    ax.set_xlabel("sketch completion (%)")
    ax.set_ylabel("ranking percentile of the true photo (%)")
    ax.set_ylim(0, 100.5)
    ax.set_title(title or "on-the-fly retrieval")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def plot_glimpses(images: np.ndarray, locations: np.ndarray, ranks: np.ndarray, out: str | Path,
                  patch_pixels: float, levels=(2, 5, 8, 11, 16), names=None) -> Path:
    """Where the policy looks: rows = sketches, columns = completion levels.

    images (S, 17, H, W) partial sketches; locations (S, 17, G, 2) in [-1, 1]; ranks (S, 17);
    patch_pixels: side of the smallest glimpse patch in image pixels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    S, H = images.shape[0], images.shape[-1]
    fig, axes = plt.subplots(S, len(levels), figsize=(2 * len(levels), 2 * S), squeeze=False)
    for i in range(S):
        for j, level in enumerate(levels):
            ax = axes[i, j]
            ax.imshow(1.0 - images[i, level], cmap="gray", vmin=0, vmax=1)
            locs = locations[i, level]
            px = location_to_pixel(locs, H)  # imshow draws pixel i's centre at i
            colours = plt.cm.viridis(np.linspace(0, 1, len(px)))
            for (x, y), c in zip(px, colours):
                ax.add_patch(Rectangle((x - patch_pixels / 2, y - patch_pixels / 2), patch_pixels, patch_pixels,
                                       fill=False, ec=c, lw=1))
            ax.plot(px[:, 0], px[:, 1], "-", color="tab:red", lw=0.6, alpha=0.7)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"level {level + 1}/17, rank {int(ranks[i, level])}", fontsize=7)
            if j == 0 and names is not None:
                ax.set_ylabel(str(names[i]), fontsize=7)
    return _save(fig, out)


def format_table(rows: dict[str, dict], spread: dict[str, dict] | None = None) -> str:
    """A Markdown table: one row per model, AUIR, acc@1/5/10, m@A (mean +- spread when given), and a
    line saying what each figure is taken on."""
    lines = ["| model | " + " | ".join(TABLE_HEAD) + " |", "|---|" + "---|" * len(TABLE_HEAD)]
    for name, metrics in rows.items():
        cells = []
        for k in TABLE_KEYS:
            v = metrics.get(k, float("nan"))
            if spread and name in spread:
                cells.append(f"{v:.2f} ± {spread[name].get(k, 0.0):.2f}")
            else:
                cells.append(f"{v:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\nAUIR and m@A: over the 17 completion levels; acc@1/5/10: complete sketches.")
    return "\n".join(lines)


def format_percentiles(curve, levels=(0, 4, 8, 12, 16)) -> str:
    """One line: the percentile curve (17 floats) at a few completion levels (indices into it)."""
    n = len(curve)
    return "percentile at completion " + ", ".join(f"{100 * (l + 1) / n:.0f}%: {curve[l]:.1f}" for l in levels)


def plot_reliability(bins: dict[str, dict], out: str | Path, title: str = "") -> Path:
    """Reliability diagram: for each event (e.g. "top-1 right", "in top 5") the share of queries where it
    happened against the mean confidence of their bin (`sketch_env.confidence.reliability_bins`), the
    diagonal being perfect calibration, and below it how many queries each bin holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    width = None
    for i, (name, b) in enumerate(bins.items()):
        edges = np.asarray(b["edges"], float)
        conf, acc, count = (np.asarray(b[k], float) for k in ("confidence", "accuracy", "count"))
        used = count > 0
        top.plot(conf[used], acc[used], marker="o", ms=4, label=name)
        width = (edges[1] - edges[0]) / (len(bins) + 1)
        bottom.bar(edges[:-1] + (i + 0.5) * width, count, width=width, label=name, align="edge")
    top.set_ylabel("share where it happened")
    top.set_xlim(0, 1), top.set_ylim(0, 1)
    top.set_title(title or "reliability of the confidence")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence (mean of the bin)")
    bottom.set_ylabel("queries")
    bottom.grid(alpha=0.3)
    return _save(fig, out)


def format_early_stop(rows: list[dict], event: str = "P(top-1 right)") -> str:
    """An early-stop table (`sketch_env.confidence.early_stop_table`) as Markdown, one row per threshold:
    each sketch stops at the first completion level whose `event` probability reaches it."""
    def pct(v):
        return "–" if v is None or v != v else f"{v:.1f}"

    lines = [f"| stop at {event} ≥ | fires (% of sketches) | top-1 right when it fires (%) | top-5 right when it fires (%) "
             "| median drawn at the stop (%) | median saved (%) | saved, all sketches (mean %) "
             "| acc@1 / acc@5 stop-or-finish (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['threshold']:.2f} | {pct(r['fires'])} ({r['n_fired']}) | {pct(r['top1_right'])} | "
                     f"{pct(r['top5_right'])} | {pct(100 * r['completion_median'])} | {pct(100 * r['saved_median'])} | "
                     f"{pct(100 * r['saved_mean_all'])} | {pct(r['top1_at_stop'])} / {pct(r['top5_at_stop'])} |")
    return "\n".join(lines)
