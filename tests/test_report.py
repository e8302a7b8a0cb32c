"""`darp report`: the table from hand-made trials, then a tiny report through Ray Tune that resumes."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from policies.running.registry import TrainConfig
from policies.running.report import (
    ReportConfig,
    is_chair_v2,
    results_markdown,
    summarise,
    trial_dir,
)


def fake_trial(model, seed, auir):
    metrics = {"auir": auir, "acc@1": 10.0, "acc@5": 50.0 + seed, "acc@10": 70.0, "m_at_a": 60.0}
    return {"model": model, "seed": seed, "train_s": 12.0, "eval_s": 1.0, "metrics": metrics,
            "curve": [50.0] * 17, "n_sketches": 20, "n_photos": 10}


def test_summarise_gives_mean_and_sample_std_over_seeds():
    mean, spread = summarise([fake_trial("darp", 0, 30.0), fake_trial("darp", 1, 34.0)])
    assert mean["auir"] == pytest.approx(32.0) and spread["auir"] == pytest.approx(np.std([30, 34], ddof=1))
    assert mean["acc@5"] == pytest.approx(50.5)
    _, one = summarise([fake_trial("darp", 0, 30.0)])
    assert one["auir"] == 0.0


def test_chair_v2_is_recognised_from_the_manifest():
    assert is_chair_v2({"name": "ChairV2_Coordinate_train", "source": "qmul:/data/chairv2/ChairV2_Coordinate_train"})
    assert not is_chair_v2({"name": "builtin-chairs", "source": "darp data generate seed=0"})
    assert not is_chair_v2({"name": "ShoeV2_Coordinate_train", "source": "qmul:/data/ShoeV2_Coordinate_train"})


def test_auto_split_is_test_when_the_data_set_has_one():
    from policies.running.report import with_split

    cfg = ReportConfig(train=TrainConfig(data="d", embedding="e", run_dir="r"))
    assert with_split(cfg, {"splits": {"train": 270, "test": 90}}).split == "test"
    assert with_split(cfg, {"splits": {"train": 952}}).split == "val"
    assert with_split(dataclasses.replace(cfg, split="val"), {"splits": {"test": 9}}).split == "val"


def test_results_markdown_has_table_iii_paper_figures_and_ordering(tmp_path):
    cfg = ReportConfig(train=TrainConfig(data="d", embedding="e", run_dir=str(tmp_path)), seeds=2,
                       models=("triplet", "ppo", "darp"))
    trials = {"triplet": [fake_trial("triplet", -1, 20.0)],
              "ppo": [fake_trial("ppo", 0, 25.0), fake_trial("ppo", 1, 27.0)],
              "darp": [fake_trial("darp", 0, 30.0), fake_trial("darp", 1, 34.0)]}
    chair = {"name": "ChairV2_Coordinate_train", "source": "qmul:x"}
    text = results_markdown(cfg, trials, chair, 5.0, failed=[])
    assert "| model | AUIR | acc@1 | acc@5 | acc@10 | m@A |" in text
    assert "| DARP-SBIR | 32.00 ± 2.83 |" in text and "| Triplet network | 20.00 ± 0.00 |" in text
    assert "| DARP-SBIR | 32.00 | 35.65 | 50.50 | 79.12 |" in text
    assert "darp (32.00) > ppo (26.00) > triplet (20.00)" in text
    assert "Not in the table" in text  # no trial has a done.json under tmp_path
    builtin = results_markdown(cfg, trials, {"name": "builtin-chairs", "source": "darp data generate"}, 5.0, [])
    assert "Beside the paper" not in builtin


def test_locator_and_robustness_tables_take_differences_per_seed(tmp_path):
    from policies.running.report import locator_table, robustness_table

    def stressed(model, seed, own, fixed, noisy):
        t = fake_trial(model, seed, own)
        t["noise"] = {"2": t["metrics"] | {"auir": own - 1.0}, "4": t["metrics"] | {"auir": noisy, "acc@5": 40.0}}
        if fixed is not None:
            t["locators"] = {"policy": {"auir": own, "fovea_on_ink": 0.5 + seed / 4, "glimpse_cells": 4.0 + 2 * seed},
                             "centre": {"auir": fixed[0], "fovea_on_ink": 0.1, "glimpse_cells": 1.0},
                             "ink": {"auir": fixed[1], "fovea_on_ink": 1.0, "glimpse_cells": 19.0}}
        return t

    trials = {"triplet": [stressed("triplet", -1, 20.0, None, 19.0)],
              "darp": [stressed("darp", 0, 30.0, (29.0, 31.0), 25.0), stressed("darp", 1, 34.0, (30.0, 32.0), 30.0)]}
    loc = locator_table(trials)
    assert loc.splitlines()[0] == "| model | own locator | centre | ink | own − best fixed | glimpses on ink (own) | cells per sketch (own / ink) |"
    # own - best fixed per seed: 30 - 31 = -1 and 34 - 32 = +2 -> mean 0.5, sample std 2.12
    assert "| DARP-SBIR | 32.00 ± 2.83 | 29.50 ± 0.71 | 31.50 ± 0.71 | 0.50 ± 2.12 | 62.5% | 5.0 / 19.0 |" in loc
    assert "Triplet" not in loc  # the triplet network does not look
    rob = robustness_table(trials)
    assert "| AUIR clean | AUIR +2 | AUIR +4 | acc@5 clean | acc@5 +2 | acc@5 +4 | AUIR lost (+4) | acc@5 lost (+4) |" in rob
    assert "| Triplet network | 20.00 ± 0.00 | 19.00 ± 0.00 | 19.00 ± 0.00 | 49.00 ± 0.00 | 49.00 ± 0.00 | 40.00 ± 0.00 | 1.00 ± 0.00 | 9.00 ± 0.00 |" in rob
    assert "| DARP-SBIR | 32.00 ± 2.83 |" in rob and "| 4.50 ± 0.71 | 10.50 ± 0.71 |" in rob
    cfg = ReportConfig(train=TrainConfig(data="d", embedding="e", run_dir=str(tmp_path)), seeds=2, models=("triplet", "darp"))
    text = results_markdown(cfg, trials, {"name": "builtin-chairs"}, 1.0, [])
    assert "## Locator value" in text and "## Robustness to unnecessary strokes" in text
    plain = {m: [fake_trial(m, t["seed"], t["metrics"]["auir"]) for t in ts] for m, ts in trials.items()}
    assert locator_table(plain) is None and robustness_table(plain) is None
    assert "## Locator value" not in results_markdown(cfg, plain, {"name": "builtin-chairs"}, 1.0, [])


def test_confidence_table_averages_over_seeds_and_shows_what_never_fired(tmp_path):
    from policies.running.report import confidence_table

    def confident(model, seed, ece, fires, right):
        stop = lambda p, f, r, r5=100.0: {"threshold": p, "fires": f, "n_fired": int(f > 0), "top1_right": r,  # noqa: E731
                                          "top5_right": r5, "saved_median": 0.25 if f else float("nan")}
        return fake_trial(model, seed, 30.0) | {"confidence": {
            "ece_top1": ece, "ece_top5": 0.02, "early_stop": [stop(0.9, fires, right), stop(0.95, 0.0, float("nan"))],
            "early_stop_top5": [stop(0.9, 50.0, 20.0, 90.0)]}}

    trials = {"triplet": [confident("triplet", -1, 0.03, 2.0, 100.0)],
              "darp": [confident("darp", 0, 0.02, 4.0, 50.0), confident("darp", 1, 0.04, 0.0, float("nan"))]}
    table = confidence_table(trials)
    head, _, triplet, darp = table.splitlines()
    assert head.startswith("| model | ECE top-1 | ECE top-5 | P(top-1) ≥ 0.9: fires % | top-1 right % | median saved % |")
    assert "P(top 5) ≥ 0.9: fires %" in head
    assert triplet == "| Triplet network | 0.030 ± 0.000 | 0.020 ± 0.000 | 2.0 ± 0.0 | 100.0 ± 0.0 | 25.0 ± 0.0 | 0.0 ± 0.0 | – | – | 50.0 ± 0.0 | 90.0 ± 0.0 | 25.0 ± 0.0 |"
    # a seed where nothing fired has no "right %" to average: the other seed's figure stands alone
    assert darp.startswith("| DARP-SBIR | 0.030 ± 0.014 | 0.020 ± 0.000 | 2.0 ± 2.8 | 50.0 ± 0.0 | 25.0 ± 0.0 |")
    cfg = ReportConfig(train=TrainConfig(data="d", embedding="e", run_dir=str(tmp_path)), seeds=2, models=("triplet", "darp"))
    assert "## Confidence: when to stop drawing" in results_markdown(cfg, trials, {"name": "x"}, 1.0, [])
    assert confidence_table({"darp": [fake_trial("darp", 0, 30.0)]}) is None


# --- a tiny report through Ray Tune ---


@pytest.fixture(scope="module")
def tiny_with_triplet(tmp_path_factory):
    """The tiny fixture, its export marked as a triplet run made from this data set."""
    from sketch_env.atomic import atomic_write_json
    from sketch_env.embedding_export import load_embedding_export, save_embedding_export
    from sketch_env.synthetic import make_tiny_setup
    from sketch_env.data import data_fingerprint

    data, phase1 = make_tiny_setup(tmp_path_factory.mktemp("tiny"))
    export = load_embedding_export(phase1)
    save_embedding_export(phase1, dataclasses.replace(export, meta={"data_fingerprint": data_fingerprint(data)}))
    atomic_write_json(phase1 / "run.json", {"kind": "triplet"})
    return data, phase1


@pytest.mark.slow
def test_report_writes_everything_and_a_rerun_skips_finished_trials(ray_local, tiny_with_triplet, tmp_path, capsys):
    from tune_runs.report import run

    data, phase1 = tiny_with_triplet
    train = TrainConfig(data=str(data), embedding=str(phase1), run_dir=str(tmp_path / "report"), iterations=1,
                        episodes_per_batch=8, num_envs_per_env_runner=4, n_glimpses=2)
    # the synthetic export has no network to embed noisy sketches with: no robustness table here
    # (tests/test_locator_eval.py adds noise strokes to real runs)
    cfg = ReportConfig(train=train, seeds=1, models=("triplet", "vanilla-pg", "darp"), split="test", n_traces=2,
                       progress_interval_s=0.0, locators=("centre", "ink"), noise_strokes=(0,))
    assert run(cfg) == 0
    out = tmp_path / "report"
    text = (out / "results.md").read_text()
    for name in ("Triplet network", "Triplet + vanilla RL", "DARP-SBIR"):
        assert f"| {name} |" in text
    for png in ("curves.png", "glimpses.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    ranks = pq.read_table(out / "ranks.parquet").to_pydict()
    assert set(ranks) == {"model", "seed", "sketch_id", "level", "rank"}
    assert sorted(set(zip(ranks["model"], ranks["seed"]))) == [("darp", 0), ("triplet", -1), ("vanilla-pg", 0)]
    n_test = len(set(ranks["sketch_id"]))
    assert len(ranks["rank"]) == 3 * 17 * n_test and min(ranks["rank"]) >= 1
    done = json.loads((trial_dir(out, "darp", 0) / "done.json").read_text())
    assert done["metrics"]["auir"] > 0 and (trial_dir(out, "darp", 0) / "glimpses.npz").is_file()
    assert set(done["locators"]) == {"policy", "centre", "ink"} and done["locators"]["ink"]["fovea_on_ink"] == 1.0
    assert (trial_dir(out, "darp", 0) / "locator-centre" / "metrics.json").is_file()
    assert "## Locator value" in text and "| DARP-SBIR |" in text.split("## Locator value")[1]
    assert not (trial_dir(out, "vanilla-pg", 0) / "glimpses.npz").exists()
    # every model's confidence, fitted on val and judged on the evaluated split
    assert (trial_dir(out, "darp", 0) / "run" / "calibration.json").is_file()
    for model, seed in (("triplet", -1), ("vanilla-pg", 0), ("darp", 0)):
        confidence = json.loads((trial_dir(out, model, seed) / "done.json").read_text())["confidence"]
        assert 0.0 <= confidence["ece_top1"] <= 1.0 and len(confidence["early_stop"]) == 3
    assert "## Confidence: when to stop drawing" in text and "| DARP-SBIR |" in text.split("## Confidence")[1]
    capsys.readouterr()

    # a rerun does nothing but rewrite the outputs
    stamp = (trial_dir(out, "darp", 0) / "done.json").stat().st_mtime_ns
    assert run(cfg) == 0
    assert "skipping 2 finished trial(s)" in capsys.readouterr().out
    assert (trial_dir(out, "darp", 0) / "done.json").stat().st_mtime_ns == stamp

    # a trial interrupted after training resumes from its checkpoint instead of training again
    (trial_dir(out, "vanilla-pg", 0) / "done.json").unlink()
    assert run(cfg) == 0
    printed = capsys.readouterr().out
    assert "running 1 trial(s)" in printed and "vanilla-pg_seed0" in printed
    from policies.running.runs import results

    assert len(results(trial_dir(out, "vanilla-pg", 0) / "run")) == 1, "the finished iteration must not be trained again"
    assert (trial_dir(out, "vanilla-pg", 0) / "done.json").is_file()


class Trap:
    """Unpickling this creates `marker`: what a planted tuner.pkl could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_no_resume_starts_an_unfinished_trial_over_without_unpickling_its_state(tmp_path):
    """Issue 25, item 11: resuming a trial unpickles Tune's tuner.pkl (and RLlib's checkpoint) from the
    report directory; `darp report --no-resume` starts unfinished trials over and opens none of them."""
    import pickle

    from policies.running import fit, runs
    from tune_runs.cli import build_config
    from policies.running.report import trial_train_config

    cfg = build_config(ReportConfig, {"data": "d", "embedding": "e", "run_dir": str(tmp_path), "resume": False})
    trial = trial_train_config(cfg, "darp", 0)
    assert trial.resume is False
    run_dir = tmp_path / "trials" / "darp_seed0" / "run"
    experiment = run_dir / runs.new_experiment_name()
    experiment.mkdir(parents=True)
    marker = tmp_path / "ran"
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(Trap(marker)))
    fit._tuner(trial, run_dir, {"kind": "darp", "config": dataclasses.asdict(trial)})
    assert not marker.exists() and not experiment.exists()
    assert trial_train_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True)), "darp", 0).resume


def test_report_help_renders(capsys):
    from tune_runs.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--time-budget-s" in out
    assert "--lr" in out and "--sup-loss" in out, "every darp train option applies to the report's runs"
    assert "--algo {" not in out and "--seed SEED" not in out, "the report sets the model and seed of each run"
    assert "--no-resume" in out


def test_bad_options_are_one_line_errors_before_anything_is_written(tmp_path, capsys):
    """The report's checks raise (ConfigError naming the option, DataError naming the input); only the CLI
    turns them into exit status 1 and one line."""
    from sketch_env.errors import ConfigError, DataError
    from policies.running.report import check_config
    from tune_runs.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "phase1").mkdir()
    train = TrainConfig(data=str(tmp_path / "data"), embedding=str(tmp_path / "phase1"), run_dir=str(tmp_path / "report"))
    with pytest.raises(ConfigError, match="--models"):
        check_config(ReportConfig(train=train, models=("triplet", "alphago")))
    with pytest.raises(ConfigError, match="--seeds"):
        check_config(ReportConfig(train=train, seeds=0))
    with pytest.raises(DataError, match="--embedding .*missing is not a directory"):
        check_config(ReportConfig(train=dataclasses.replace(train, embedding=str(tmp_path / "missing"))))
    status = main(["report", "--data", train.data, "--embedding", train.embedding, "--run-dir", train.run_dir,
                   "--models", "alphago"])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and err.startswith("darp report: error: --models")
    assert not (tmp_path / "report").exists()
