"""`darp evaluate`: retrieval figures of a trained run on one split of a data set.

    darp evaluate --data /tmp/builtin --split test --run /tmp/runs/triplet --out /tmp/eval/triplet

The gallery is the photos of the evaluated split (or of `--gallery` shards, `darp embed-photos`); every sketch of
the split is a query at each of the 17 completion levels. A triplet run (`darp pretrain`) is queried with the
embedding of each partial sketch (from its export when the export was made from this data set, else by running its
saved network); an RL run (`darp train`) with its policy, on the phase-1 embeddings of its export, except for
sketches (photos) whose strokes (bytes) changed since the export was made: those are re-embedded by its phase-1
network, so the ranks always belong to the strokes evaluated.

`--match` ranks in another mode than the run's own (sketch_env.local_match): a triplet run in local
match takes its glimpses where a fixed `--locator` rule puts them (what local matching gives without
RL), in dense match it compares every cell; an RL run can be ranked densely in place of its glimpses.

Writes OUT/metrics.json (auir, m_at_a, acc@1, acc@5, acc@10, percentile_curve, n_sketches, n_photos, the
confidence's figures, match and its cost: multiply-adds per gallery photo to score one query at one level),
OUT/curve.png (ranking percentile vs completion), OUT/ranks.parquet (sketch_id, level, rank and each query's
confidence), OUT/reliability.png (the reliability diagram, where the run has a confidence) and, for a policy
that looks, OUT/glimpses.png; prints the figures as a table.

The options are policies.running.evaluate.EvaluateConfig's; the engine is policies.running.evaluate.evaluate_run.
"""

from __future__ import annotations

from policies.running.evaluate import EvaluateConfig, evaluate_run

__all__ = ["EvaluateConfig", "run"]


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate the run (`policies.running.evaluate.evaluate_run`); returns its metrics."""
    return evaluate_run(cfg)
