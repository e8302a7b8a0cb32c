"""Run directories for end-to-end RL tests without training: an untrained RL run, a small phase-1 run, the
serve tests' runs (the tiny data sets themselves: sketch_env.synthetic)."""

from pathlib import Path

from sketch_env.atomic import atomic_write_json


def save_untrained_run(run_dir: Path, data: Path, embedding: Path, **train_options) -> Path:
    """A run directory as `darp train` leaves it, without training (no Ray): run.json and one complete checkpoint
    (iteration 0, not validated) holding the RLModule as RLlib itself writes it (class_and_ctor_args.pkl,
    module_state.pkl), with initial weights."""
    import dataclasses

    from ray.rllib.core import DEFAULT_MODULE_ID

    from sketch_env.embedding_export import load_embedding_export
    from sketch_env.env import EnvConfig, action_space, observation_space
    from sketch_env.local_grids import local_grid_shape
    from policies.running.registry import TrainConfig, build_algo_config, with_algo_defaults
    from policies.running import runs

    run_dir = Path(run_dir)
    cfg = with_algo_defaults(TrainConfig(data=str(data), embedding=str(embedding), run_dir=str(run_dir), **train_options))
    dim = load_embedding_export(embedding).dim
    local_shape = local_grid_shape(embedding) if cfg.match != "global" else None
    spaces = (observation_space(EnvConfig(n_glimpses=cfg.n_glimpses, match=cfg.match), dim, local_shape), action_space(dim))
    module = build_algo_config(cfg).get_rl_module_spec(spaces={DEFAULT_MODULE_ID: spaces}).build()
    checkpoint = run_dir / runs.new_experiment_name() / runs.TRIAL / "checkpoint_000000"
    module.save_to_path(str((checkpoint / runs.MODULE_PATH).resolve()))
    runs.write_checkpoint_info(checkpoint, 0, {})
    atomic_write_json(run_dir / "run.json", {"kind": cfg.algo, "config": dataclasses.asdict(cfg),
                                             "data": str(data), "embedding": str(embedding)})
    return run_dir


def make_phase1_run(root: Path, data: Path, **options) -> Path:
    """A tiny real phase-1 run (`darp pretrain`, a few seconds: network and export) on `data`; `options`: more
    `darp pretrain` settings (e.g. local_dim=8 for local descriptor grids)."""
    from tune_runs.pretrain import PretrainConfig
    from tune_runs.pretrain import run as pretrain

    phase1 = root / "phase1"
    pretrain(PretrainConfig(data=data, run_dir=phase1, epochs=1, batch_size=16, image_size=32, embedding_dim=16,
                            eval_batch=256, time_budget_s=5.0, **options))
    return phase1


def make_serve_runs(root: Path, data: Path) -> Path:
    """Train a tiny phase-1 network and a tiny DARP run on `data`, with its confidence fitted on val
    (as `darp train` does); returns the DARP run."""
    from policies.running.fit import train
    from policies.running.registry import TrainConfig
    from policies.running.calibration import calibrate_run

    phase1 = make_phase1_run(root, data)
    darp = root / "darp"
    train(TrainConfig(data=str(data), embedding=str(phase1), run_dir=str(darp), iterations=1,
                      num_envs_per_env_runner=4, episodes_per_batch=8, n_glimpses=2, val_interval=0), quiet=True)
    calibrate_run(darp, data, "val", quiet=True)
    return darp


def free_port() -> int:
    """A TCP port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
