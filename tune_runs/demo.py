"""`darp demo`: the whole pipeline on the built-in data set, the README's first command.

generate data -> (import the real Chair-V2 training sketches when ../shared/data is there) ->
previews -> pretrain the triplet network -> train DARP -> evaluate both on the validation split ->
print the table, write curves.png and glimpses.png. About 10 minutes on 2 CPU cores.
Everything goes under --run-dir; a second run re-uses finished stages (each stage resumes).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sketch_env.atomic import OutputKind, atomic_write_text, prepare_output_dir
from sketch_env.options import arg


@dataclass
class DemoConfig:
    """Run the whole pipeline on the built-in data set."""

    run_dir: str = arg("runs/demo", "output directory (data, runs, figures)")
    shared_data: str = arg("../shared/data", "directory with the real data (chairv2/, sketchy/); skipped if absent")
    photos: int = arg(400, "built-in data set: photos")
    sketches_per_photo: int = arg(3, "built-in data set: sketches per photo")
    seed: int = arg(0, "seed of data generation and training")
    pretrain_budget_s: float = arg(150.0, "time budget of phase 1 (triplet network)")
    train_budget_s: float = arg(180.0, "time budget of phase 2 (DARP)")
    train_iterations: int = arg(200, "most DARP iterations")
    split: str = arg("val", "split evaluated (val: 20% of the train photos; test: the held-out test photos)")
    force: bool = arg(False, "write into --run-dir even if it holds something other than a demo")


def _stage(name: str):
    print(f"\n=== {name} " + "=" * max(0, 60 - len(name)), flush=True)
    return time.time()


DEMO_KIND = OutputKind("demo", ("data/manifest.json", "phase1", "results.md"))


def run(cfg: DemoConfig) -> int:
    from policies.running.registry import TrainConfig
    from sketch_env.data import load_dataset
    from sketch_env.data.generate import generate_dataset
    from policies.running.evaluate import EvaluateConfig, evaluate_run
    from policies.running.plots import format_table, plot_curves
    from tune_runs import data_cmd, pretrain
    from tune_runs import train as train_cmd

    root = prepare_output_dir(cfg.run_dir, DEMO_KIND, inputs=(cfg.shared_data,), force=cfg.force)
    timings = {}

    t = _stage("data")
    data = root / "data"
    if not (data / "manifest.json").exists():
        generate_dataset(data, n_photos=cfg.photos, sketches_per_photo=cfg.sketches_per_photo, seed=cfg.seed)
    ds = load_dataset(data)
    print(f"built-in data set: {len(ds.sketches)} sketches of {len(ds.photos)} photos in {data}")
    previews = root / "previews"
    for sid in ds.sketches.sketch_id[:3]:
        data_cmd.show(data_cmd.ShowConfig(data=str(data), sketch=str(sid), out=str(previews / f"builtin_{sid}.png")))
    chair = Path(cfg.shared_data) / "chairv2"
    if (chair / "ChairV2_Coordinate_train").is_file():
        real = root / "chairv2"
        if not (real / "manifest.json").exists():
            data_cmd.import_qmul(data_cmd.ImportQMULConfig(
                coords=str(chair / "ChairV2_Coordinate_train"), photos=str(chair / "photo"), out=str(real)))
        real_ds = load_dataset(real)
        for sid in real_ds.sketches.sketch_id[:3]:
            name = str(sid).strip("/").replace("/", "_")
            data_cmd.show(data_cmd.ShowConfig(data=str(real), sketch=str(sid), out=str(previews / f"chairv2_{name}.png")))
    else:
        print(f"no real data at {chair}: skipping the Chair-V2 import")
    print(f"previews in {previews}")
    timings["data"] = time.time() - t

    t = _stage("phase 1: triplet embedding network")
    phase1 = root / "phase1"
    pretrain.run(pretrain.PretrainConfig(data=str(data), run_dir=str(phase1), time_budget_s=cfg.pretrain_budget_s,
                                         seed=cfg.seed))
    timings["pretrain"] = time.time() - t

    t = _stage("phase 2: DARP on RLlib")
    darp_dir = root / "darp"
    train_cmd.run(TrainConfig(data=str(data), embedding=str(phase1), run_dir=str(darp_dir),
                              iterations=cfg.train_iterations, time_budget_s=cfg.train_budget_s, seed=cfg.seed))
    timings["train"] = time.time() - t

    t = _stage(f"evaluation on the {cfg.split} split")
    results, curves = {}, {}
    for name, run_dir in (("Triplet network", phase1), ("DARP-SBIR", darp_dir)):
        out = root / "eval" / run_dir.name
        evaluate_run(EvaluateConfig(data=str(data), run=str(run_dir), split=cfg.split, out=str(out)))
        metrics = json.loads((out / "metrics.json").read_text())
        results[name], curves[name] = metrics, metrics["percentile_curve"]
    plot_curves(curves, root / "curves.png", title=f"built-in data set, {cfg.split} split")
    timings["evaluate"] = time.time() - t

    table = format_table(results)
    atomic_write_text(root / "results.md", f"# Demo results ({cfg.split} split of the built-in data set)\n\n{table}\n")
    print("\n" + table)
    print("\nstage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"figures: {root / 'curves.png'}, {root / 'eval' / 'darp' / 'glimpses.png'}; table: {root / 'results.md'}")
    return 0
