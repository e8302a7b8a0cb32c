"""The shared figures and tables (policies.running.plots), and `darp evaluate` printing through them."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from sketch_env.atomic import atomic_write_json
from sketch_env.data import data_fingerprint
from sketch_env.embedding_export import load_embedding_export, save_embedding_export
from policies.running.plots import format_percentiles, format_table, plot_curves

METRICS = {"auir": 71.234, "acc@1": 10.0, "acc@5": 45.5, "acc@10": 80.0, "m_at_a": 33.333}


def test_format_table_one_row_per_model_with_spreads():
    table = format_table({"a": METRICS, "b": METRICS | {"auir": 5.0}}, spread={"b": {"auir": 1.5}})
    assert table.splitlines() == [
        "| model | AUIR | acc@1 | acc@5 | acc@10 | m@A |",
        "|---|---|---|---|---|---|",
        "| a | 71.23 | 10.00 | 45.50 | 80.00 | 33.33 |",
        "| b | 5.00 ± 1.50 | 10.00 ± 0.00 | 45.50 ± 0.00 | 80.00 ± 0.00 | 33.33 ± 0.00 |",
        "",
        "AUIR and m@A: over the 17 completion levels; acc@1/5/10: complete sketches.",
    ]


def test_format_percentiles_names_the_completion_of_each_level():
    curve = np.arange(17) * 5.0
    assert format_percentiles(curve) == ("percentile at completion 6%: 0.0, 29%: 20.0, 53%: 40.0, 76%: 60.0, "
                                         "100%: 80.0")


def test_plot_curves_draws_one_line_per_model_over_completion(tmp_path, monkeypatch):
    import policies.running.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig))
    plot_curves({"a": list(range(17)), "b": [50.0] * 17}, tmp_path / "c.png", title="t")
    (ax,) = figures[0].axes
    assert [line.get_label() for line in ax.lines] == ["a", "b"]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), 100 * np.arange(1, 18) / 17)
    assert ax.get_ylim() == (0, 100.5) and ax.get_title() == "t"


def test_evaluate_prints_the_shared_table_and_the_percentile_line(tmp_path, capsys):
    """A triplet run whose export covers the data set: no network needed, the table is plots'."""
    from sketch_env.synthetic import make_tiny_setup
    from policies.running.evaluate import EvaluateConfig, evaluate_run

    data, phase1 = make_tiny_setup(tmp_path)
    export = load_embedding_export(phase1)
    save_embedding_export(phase1, dataclasses.replace(export, meta={"data_fingerprint": data_fingerprint(data)}))
    atomic_write_json(phase1 / "run.json", {"kind": "triplet"})
    metrics = evaluate_run(EvaluateConfig(data=data, run=phase1, split="all", out=tmp_path / "eval"))
    out = capsys.readouterr().out
    assert "queries from its embedding export" in out
    assert f"triplet on all: {metrics['n_sketches']} sketches, gallery of {metrics['n_photos']} photos" in out
    assert format_table({"triplet": metrics}) in out
    assert format_percentiles(metrics["percentile_curve"]) in out
    assert re.search(r"^percentile at completion 6%: \d+\.\d, ", out, re.M)
    assert (tmp_path / "eval" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["n_sketches"] == len(export.sketch_id)
