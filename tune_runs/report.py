"""`darp report`: train and evaluate the paper's models over several seeds; its Table III and Fig. 7.

    darp report --data runs/demo/data --embedding runs/demo/phase1 --run-dir runs/report --seeds 3

Ray Tune runs one trial per (model, seed), `max_concurrent` at a time, each a function trainable
that trains with `darp train` (policies.running.fit.train, quiet: the run is itself a Tune trial, started from
inside this one; it keeps the checkpoint with the best AUIR on the val split) and evaluates that
policy on --split (policies.running.trained.evaluate_policy_run): the test split where the data set has one,
so the figures are not the ones the selection saw. Every `darp train` option sets what all trials
train with. A trial keeps everything in run_dir/trials/MODEL_seedS/: run/ (the training run,
policies.running.runs' layout), metrics.json, ranks.parquet, glimpses.npz (models that choose where to look)
and done.json, written last. The triplet row is the embedding run itself, evaluated once (trials/triplet/).

Rerunning the same command resumes: trials with done.json are skipped (their files are read as JSON,
Parquet and numpy arrays, no pickles), an unfinished one continues from its last checkpoint, which
restores Tune's and RLlib's pickled state (`--no-resume`: it starts over instead, unpickling
nothing). Then it writes under --run-dir:
- results.md: AUIR, acc@1, acc@5, acc@10, m@A as mean ± standard deviation over seeds (Table III's
  shape), the paper's Chair-V2 figures beside ours when the data set is Chair-V2, the AUIR ordering
  and the time each model took;
- curves.png: mean ranking percentile vs completion, one line per model (the paper's Fig. 7);
- glimpses.png: where DARP looks, level by level, on a few sketches of the split;
- ranks.parquet: model, seed, sketch_id, level, rank for every evaluated sketch (seed -1: triplet).

Two stress tables follow the main one (issue 15): locator value, each model that looks evaluated again
with every fixed locator of --locators in place of its own (`darp evaluate --locator`; value = its own
AUIR minus the best fixed one, per seed), and robustness, every model (the triplet network too)
evaluated again with --noise-strokes unnecessary strokes added to every sketch (`darp evaluate
--noise-strokes`). Their evaluations sit in the trial's locator-NAME/ and noise-N/ folders.

With --match local or dense (issue 23) the runs rank with local descriptors, and the report adds what local
matching gives without RL: the triplet network's queries with glimpses placed by each fixed rule
(`triplet-local-RULE`, `darp evaluate --match local --locator RULE`) and with dense matching over every cell
or every inked cell (`triplet-dense`, `triplet-dense-ink`), evaluated once like the triplet row; the
locator-value table gets columns for the same trained networks ranked densely (dense/ and dense-ink/ folders),
and a cost table gives each row's multiply-adds per gallery photo to score one query at one level.

The options are policies.running.report.ReportConfig's; the engine is policies.running.report.run_report.
"""

from __future__ import annotations

from policies.running.report import ReportConfig, run_report

__all__ = ["ReportConfig", "run"]


def run(cfg: ReportConfig) -> int:
    """Run the report (`policies.running.report.run_report`); exit status 1 when a trial failed (a rerun retries it)."""
    return 1 if run_report(cfg) else 0
