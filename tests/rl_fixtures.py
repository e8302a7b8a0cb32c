"""A tiny data set and phase-1 export for end-to-end RL tests (no CNN training needed).

The export's sketch embeddings move from a noisy point towards the photo's embedding as the
sketch completes, like a real phase-1 network's, so rankings and rewards are meaningful.
"""

from pathlib import Path

import numpy as np

from sketch_env.data import load_dataset
from sketch_env.data.generate import generate_dataset
from sketch_env.embeddings import EmbeddingExport, save_embedding_export
from sketch_env.atomic import atomic_write_json


def make_tiny_setup(root: Path, n_photos: int = 10, sketches_per_photo: int = 2, dim: int = 16, seed: int = 0):
    """Writes root/data (built-in generator) and root/phase1 (a synthetic export); returns both paths."""
    data = generate_dataset(root / "data", n_photos=n_photos, sketches_per_photo=sketches_per_photo, seed=seed,
                            test_fraction=0.2)
    ds = load_dataset(data)
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    photo_emb = unit(rng.normal(size=(len(ds.photos), dim))).astype(np.float32)
    index = {p: i for i, p in enumerate(ds.photos.photo_id)}
    target = photo_emb[[index[p] for p in ds.sketches.photo_id]]
    noise = unit(rng.normal(size=(len(ds.sketches), dim)))
    w = np.linspace(0.2, 0.9, 17)[None, :, None]
    sketch_emb = unit(w * target[:, None] + (1 - w) * noise[:, None]).astype(np.float32)
    export = EmbeddingExport(
        photo_id=ds.photos.photo_id, photo_split=ds.photos.split, photo_embedding=photo_emb,
        sketch_id=ds.sketches.sketch_id, sketch_photo_id=ds.sketches.photo_id, sketch_split=ds.sketches.split,
        sketch_embedding=sketch_emb, meta={"synthetic": True},
    )
    phase1 = root / "phase1"
    save_embedding_export(phase1, export)
    atomic_write_json(phase1 / "run.json", {"kind": "synthetic-export"})
    return data, phase1


def save_untrained_run(run_dir: Path, data: Path, embedding: Path, **train_options) -> Path:
    """A run directory as `darp train` leaves it, without training (no Ray): run.json and the RLModule
    checkpoint RLlib itself writes (class_and_ctor_args.pkl, module_state.pkl), with initial weights."""
    import dataclasses

    from ray.rllib.core import DEFAULT_MODULE_ID

    from sketch_env.embeddings import load_embedding_export
    from sketch_env.env import EnvConfig, action_space, observation_space
    from sketch_env.local_grids import local_grid_shape
    from policies.registry import TrainConfig, build_algo_config, with_algo_defaults
    from policies.runs import MODULE_PATH

    run_dir = Path(run_dir)
    cfg = with_algo_defaults(TrainConfig(data=str(data), embedding=str(embedding), run_dir=str(run_dir), **train_options))
    dim = load_embedding_export(embedding).dim
    local_shape = local_grid_shape(embedding) if cfg.match != "global" else None
    spaces = (observation_space(EnvConfig(n_glimpses=cfg.n_glimpses, match=cfg.match), dim, local_shape), action_space(dim))
    module = build_algo_config(cfg).get_rl_module_spec(spaces={DEFAULT_MODULE_ID: spaces}).build()
    module.save_to_path(str((run_dir / "checkpoint" / MODULE_PATH).resolve()))
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
    from policies.fit import train
    from policies.registry import TrainConfig
    from tune_runs.calibrate import calibrate_run

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
