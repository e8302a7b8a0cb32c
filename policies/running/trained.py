"""Loading trained RL runs (DARP and the RL baselines) safely, and acting with them.

`darp evaluate`, `darp play --policy RUN`, `darp report` and `darp serve` load a run's RLModule here
without unpickling anything but plain data from the run directory: the module is rebuilt from
run.json (the `darp train` config, through the code that built the training config) and its
weights are read from RLlib's `module_state.pkl` by a restricted unpickler that only rebuilds numpy
arrays and plain containers (`sketch_env.safe_pickle`). RLlib's `class_and_ctor_args.pkl` and every
other pickle of the checkpoint are never opened here; only `darp train --resume` reads them.
Acting goes through `policies.darp.rollout` (`run_episodes`, `policy_step`, `LivePolicy`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from policies.running.runs import best_module_dir, read_run
from sketch_env.data import DataError
from sketch_env.errors import ConfigError

MODULE_STATE = "module_state.pkl"


def module_weights_path(run_dir: str | Path) -> Path:
    """The trained RLModule's weights (RLlib's module_state.pkl) in the checkpoint evaluation uses:
    the best validation AUIR, else the latest (`policies.running.runs.best_module_dir`)."""
    return best_module_dir(run_dir) / MODULE_STATE


def train_config(run: dict, run_dir: str | Path = "RUN"):
    """The TrainConfig of a run of `darp train`, rebuilt from its run.json (options it predates take
    their defaults, which are what it trained with). Its values are checked as `darp train --config`
    checks a file's (types, then `TrainConfig.check`'s ranges), so a hand-edited run.json is refused
    by name before any network is built: n_heads -3, glimpse_size 0, n_heads 1e12 (petabytes)."""
    from policies.running.registry import ALGOS, TrainConfig, with_algo_defaults
    from sketch_env.options import checked_values

    where = Path(run_dir) / "run.json"
    config = run.get("config")
    if not isinstance(config, dict) or config.get("algo", "darp") not in ALGOS:
        raise DataError(f"{where}: not an RL run of `darp train` (kind {run.get('kind')!r})")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = with_algo_defaults(TrainConfig(**checked_values(TrainConfig, {k: v for k, v in config.items() if k in names},
                                                              f"{where}: config")))
        cfg.check()
    except ConfigError as e:
        raise DataError(str(e) if str(e).startswith(str(where)) else f"{where}: config: {e}") from None
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: cannot rebuild the training config ({e})") from None
    return cfg


def env_options(run: dict) -> dict:
    """The environment options (EnvConfig names) a run trained with, but where its episodes come from."""
    from policies.running.registry import env_config_of

    options = env_config_of(train_config(run))
    for key in ("data", "embedding", "split"):
        options.pop(key)
    return options


def algorithm_config(run_dir: str | Path, run: dict):
    """The RLlib AlgorithmConfig a run of `darp train` trained with, rebuilt from its run.json."""
    from policies.running.registry import build_algo_config

    try:
        return build_algo_config(train_config(run, run_dir))
    except (TypeError, ValueError) as e:
        raise DataError(f"{Path(run_dir) / 'run.json'}: cannot rebuild the training config ({e})") from None


def run_spaces(run: dict):
    """(observation space, action space) of the env a run trained in (its phase-1 export gives D, and its
    local grids (h, w, d) in local and dense match)."""
    from sketch_env.embedding_export import load_embedding_export
    from sketch_env.env import EnvConfig, action_space, observation_space
    from sketch_env.local_grids import local_grid_shape

    config = EnvConfig(**env_options(run))
    dim = load_embedding_export(run["embedding"]).dim
    local_shape = local_grid_shape(run["embedding"]) if config.match != "global" else None
    return observation_space(config, dim, local_shape), action_space(dim)


def load_module(run_dir: str | Path, observation_space=None, action_space=None):
    """The trained RLModule of an RL run, in eval mode, loaded without running code from the run.

    The module is built from run.json's config for the given spaces (default: the run's own env,
    `run_spaces`); its weights come from `module_weights_path(run_dir)` through the restricted
    unpickler, and must match the module exactly. DataError naming the file for anything else: a
    missing, truncated or booby-trapped module_state.pkl, or weights of another architecture.
    """
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID

    from sketch_env.safe_pickle import load_numpy_pickle

    run = read_run(run_dir)
    config = algorithm_config(run_dir, run)
    if observation_space is None or action_space is None:
        observation_space, action_space = run_spaces(run)
    path = module_weights_path(run_dir)
    if not path.is_file():
        raise DataError(f"{run_dir}: no trained module at {path}; train one with `darp train --run-dir {run_dir}`")
    state = load_numpy_pickle(path, "RLModule weights pickle")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise DataError(f"{path}: expected a dict of named weights, got {type(state).__name__}")
    try:
        module = config.get_rl_module_spec(spaces={DEFAULT_MODULE_ID: (observation_space, action_space)}).build()
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{Path(run_dir) / 'run.json'}: cannot build the module it describes ({e})") from None
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DataError(f"{path}: the weights do not fit the module run.json describes "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
        module.load_state_dict(tensors, strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DataError(f"{path}: the weights do not fit the module run.json describes ({str(e).splitlines()[0]})") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise DataError(f"{path}: weight {bad[0]!r} holds NaN or infinite values ({len(bad)} such weight(s)); "
                        "the run diverged or the file was altered")
    module.eval()
    return module


def load_run_episodes(run: dict, data_dir: str | Path, split: str, noise_strokes: int = 0, noise_seed: int = 0,
                      match: str | None = None, gallery_dir: str | Path | None = None):
    """The episodes of `split` for an RL run: phase-1 embeddings from the run's export, with the
    sketches and photos that changed since it was made re-embedded by its phase-1 network.

    noise_strokes: add this many noise strokes to every sketch (`sketch_env.strokes.with_noise_strokes`,
    seeded by noise_seed); their partial sketches are embedded by the phase-1 network.
    gallery_dir: rank among the photos of these shards (`darp embed-photos`, see `shards_gallery`)
    instead of the split's photos.
    match: the match mode they are for (default: the run's); local and dense load the local grids too.
    """
    options = env_options(run)
    local = (match or options["match"]) != "global"
    if gallery_dir is not None:
        return _shard_episodes(run, data_dir, split, options["image_size"], local, noise_strokes, noise_seed, gallery_dir)
    return load_episodes(run["embedding"], data_dir, split, options["image_size"], local, noise_strokes, noise_seed)


def _shard_episodes(run: dict, data_dir, split: str, image_size: int, local: bool, noise_strokes: int, noise_seed: int,
                    gallery_dir):
    """`load_run_episodes` with every photo of the shards in `gallery_dir` as the gallery."""
    from policies.phase1.embedding import noisy_episode_data, reembedders
    from sketch_env.data import load_dataset, select_split
    from sketch_env.embedding_export import load_embedding_export, sketch_embeddings_for
    from sketch_env.episodes import episode_data

    if local:
        raise DataError(f"{gallery_dir}: photo shards hold no local grids; local and dense matches rank the data set's photos")
    split_data = select_split(load_dataset(data_dir), split)
    gallery = shards_gallery(gallery_dir, run["embedding"], split_data)
    if noise_strokes:
        return noisy_episode_data(split_data, gallery, run["embedding"], noise_strokes, noise_seed, image_size)
    embed = reembedders(run["embedding"], log=print)["embed_sketches"]
    sketches = sketch_embeddings_for(load_embedding_export(run["embedding"]), split_data.sketches, run["embedding"],
                                     data_dir, embed)
    return episode_data(split_data, gallery, sketches, image_size)


def load_episodes(embedding: str | Path, data_dir: str | Path, split: str, image_size: int = 64, local: bool = False,
                  noise_strokes: int = 0, noise_seed: int = 0):
    """The episodes of `split` on phase-1 run `embedding`'s export (and its local grids if `local`), what changed
    since re-embedded by its network; with noise_strokes, noisy sketches embedded by it (`load_run_episodes`)."""
    from policies.phase1.embedding import grid_reembedders, noisy_episode_data, reembedders
    from sketch_env.data import load_dataset, select_split
    from sketch_env.embedding_export import gallery_for, load_embedding_export
    from sketch_env.episodes import load_episode_data
    from sketch_env.local_grids import load_local_grids, photo_grids_for

    regrid = grid_reembedders(embedding) if local else {}
    if not noise_strokes:
        return load_episode_data(data_dir, embedding, split, image_size, local=local,
                                 **reembedders(embedding, log=print), **regrid)
    split_data = select_split(load_dataset(data_dir), split)
    gallery = gallery_for(load_embedding_export(embedding), split_data.photos, embedding, data_dir,
                          reembedders(embedding, log=print)["embed_photos"])
    photo_grids = (photo_grids_for(load_local_grids(embedding), split_data.photos, embedding, regrid["embed_photo_grids"])
                   if local else None)
    return noisy_episode_data(split_data, gallery, embedding, noise_strokes, noise_seed, image_size, photo_grids)


def make_env(run: dict, data_dir: str | Path, split: str, num_envs: int, render_mode: str | None = None, episodes=None,
             match: str | None = None):
    """The batched env an RL run was trained with, on another data directory/split (on `episodes`
    when given, e.g. from `load_run_episodes`); `match` replaces its match mode (evaluation's --match)."""
    from sketch_env.vector_env import make_vector_env

    return make_vector_env(
        {
            **env_options(run),
            **({"match": match} if match else {}),
            "data": str(Path(data_dir).resolve()),
            "embedding": run["embedding"],
            "split": split,
            "sketch_order": "sequential",
            "num_envs": num_envs,
            "episodes": episodes,
        }
    )


def evaluate_policy_run(run_dir: Path, data_dir: Path, split: str, n_traces: int = 6,
                        locator: str = "policy", seed: int = 0, episodes=None, match: str | None = None) -> dict:
    """Ranks (S, 17) of the deterministic policy on every sketch of `split`, plus glimpse traces.

    locator: "policy" (its own) or a rule of `sketch_env.locators` that chooses every location in
    its place (seeded by `seed`). episodes: the EpisodeData to evaluate on (default:
    `load_run_episodes`, which re-embeds sketches changed since the run's phase-1 export).
    Returns {"ranks", "sketch_id", "photo_id" (each sketch's true photo), "n_photos", "queries" (S, 17, D:
    what each rank was computed from, as the env clipped it), "gallery" (they were ranked against),
    "fovea_on_ink" (share of chosen glimpses with ink in the finest patch) and "glimpse_cells" (mean
    distinct cells of an 8 x 8 grid per episode among its chosen glimpses), both None for a policy that
    does not look, "extras": {"trace": Trace of the first n_traces, ...}}.
    match: rank in another match mode than the run trained in (e.g. "dense": every cell's local
    term in place of the glimpses'); a run trained with local observations needs local or dense.
    """
    from policies.darp.rollout import FixedLocator, rollout_ranks, run_episodes

    run = read_run(run_dir)
    match = check_match(run, run_dir, match)
    episodes = episodes if episodes is not None else load_run_episodes(run, data_dir, split, match=match)
    env = make_env(run, data_dir, split, num_envs=64, episodes=episodes, match=match)
    module = load_module(run_dir, *run_spaces(run))
    looks = bool(getattr(module, "attention", False))
    if locator != "policy" and not looks:
        raise DataError(f"{run_dir}: a {run.get('kind')} run does not choose where to look; --locator needs a policy that looks")
    n = len(env.episodes)
    fixed = FixedLocator(locator, env.episodes, seed) if locator != "policy" else None
    rollout = rollout_ranks(module, env, np.arange(n), locator=fixed)
    trace_env = make_env(run, data_dir, split, num_envs=min(n_traces, n), episodes=episodes, match=match)
    trace_locator = FixedLocator(locator, trace_env.episodes, seed) if locator != "policy" else None
    trace = run_episodes(module, trace_env, np.arange(min(n_traces, n)), locator=trace_locator)
    return {
        "ranks": rollout.ranks,
        "sketch_id": np.asarray(env.episodes.sketch_id),
        "photo_id": np.asarray(env.episodes.photo_id),
        "n_photos": len(env.episodes.gallery),
        "queries": rollout.queries,
        "gallery": env.episodes.gallery,
        "fovea_on_ink": rollout.on_ink if looks else None,
        "glimpse_cells": float(rollout.cells.mean()) if looks else None,
        "extras": {"trace": trace, "episodes": trace_env.episodes, "env_config": trace_env.config},
    }


def check_match(run: dict, run_dir, match: str | None) -> str:
    """The match mode to evaluate a run in: `match`, or the run's own when None; DataError for a global one
    asked of a run whose policy reads local observations."""
    own = env_options(run)["match"]
    match = match or own
    if own != "global" and match == "global":
        raise DataError(f"{run_dir}: trained with --match {own}, its policy reads the local descriptors: evaluate it "
                        "with --match local or dense")
    return match


class Phase1Query:
    """The phase-1 (triplet) network as a policy: its query is the phase-1 embedding of the current partial
    sketch; it looks at the centre unless a `policies.darp.rollout.FixedLocator` chooses in its place. The fixed
    rules in local match, without RL (`evaluate_triplet_local`)."""

    attention = True

    def get_initial_state(self) -> dict:
        return {}

    def eval(self):
        return self

    def forward_inference(self, batch: dict) -> dict:
        import torch
        from ray.rllib.core.columns import Columns

        query = batch[Columns.OBS]["sketch_embedding"]
        return {Columns.ACTIONS: {"location": torch.zeros(*query.shape[:2], 2), "query": query}, Columns.STATE_OUT: {}}

    forward_exploration = forward_inference


def evaluate_triplet_local(embedding: Path, data_dir: Path, split: str, match: str, locator: str, n_glimpses: int,
                           local_weight: float = 1.0, seed: int = 0, noise_strokes: int = 0, noise_seed: int = 0,
                           n_traces: int = 6) -> dict:
    """Ranks (S, 17) of the triplet network's queries on `split` in local or dense matches, glimpses placed by a
    fixed rule (`locator`: centre, random, ink, newest-ink; dense and dense-ink ignore it): what local matching
    gives without any learning beyond phase 1. Returns evaluate_policy_run's dict."""
    from policies.darp.rollout import FixedLocator, rollout_ranks, run_episodes
    from sketch_env.vector_env import make_vector_env

    if match == "global":
        raise ValueError("evaluate_triplet_local is for match local or dense")
    episodes = load_episodes(embedding, data_dir, split, 64, True, noise_strokes, noise_seed)
    options = {"match": match, "n_glimpses": n_glimpses, "local_weight": local_weight, "sketch_order": "sequential"}
    env = make_vector_env({**options, "num_envs": 64, "episodes": episodes})
    n = len(episodes)
    rollout = rollout_ranks(Phase1Query(), env, np.arange(n), locator=FixedLocator(locator, episodes, seed))
    trace_env = make_vector_env({**options, "num_envs": min(n_traces, n), "episodes": episodes})
    trace = run_episodes(Phase1Query(), trace_env, np.arange(min(n_traces, n)), locator=FixedLocator(locator, episodes, seed))
    return {"ranks": rollout.ranks, "sketch_id": np.asarray(episodes.sketch_id), "n_photos": len(episodes.gallery),
            "fovea_on_ink": rollout.on_ink, "glimpse_cells": float(rollout.cells.mean()), "extras": {"trace": trace, "episodes": episodes, "env_config": trace_env.config}}


class TrainedPolicy:
    """A trained run acting in a single env (for `darp play`): act(obs, state) -> (action, state).

    env: the single env it acts in (its spaces must be those the run trained with).
    """

    def __init__(self, run_dir: str | Path, env):
        self.module = load_module(run_dir, env.observation_space, env.action_space)

    def initial_state(self):
        from policies.darp.rollout import initial_state

        return initial_state(self.module, 1)

    def act(self, obs: dict, state):
        import torch

        from policies.darp.rollout import policy_step

        batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in obs.items()}
        with torch.no_grad():
            actions, state = policy_step(self.module, batch, state)
        return {k: v[0].numpy() for k, v in actions.items()}, state


def read_darp_run(run_dir: str | Path) -> dict:
    """run.json of a DARP run (`darp train`); DataError naming the directory for any other run."""
    run = read_run(run_dir)
    if run.get("kind") != "darp" or "embedding" not in run:
        raise DataError(f"{run_dir}: not a DARP run (run.json kind {run.get('kind')!r}); serve a run of `darp train`")
    return run


def shards_gallery(gallery_dir: str | Path, embedding_run: str | Path, split=None, log=None, require_targets: bool = True):
    """The Gallery of every photo in the shards of `darp embed-photos` in `gallery_dir`.

    Checked before use: embedded by the phase-1 network of `embedding_run` (the one that embeds the
    queries), and, for a `split` (a `select_split` result), holding its sketches' photos (unless not
    `require_targets`) with the same image bytes as the data set's
    (`sketch_env.photo_shards.gallery_from_shards`). Above
    `sketch_env.gallery_index.EXACT_UP_TO` photos the shards' saved index (or, without one, an
    IVF-PQ index built now) serves `topk`; ranks stay exact.
    """
    from sketch_env.gallery_index import EXACT_UP_TO, IndexConfig, build_index, load_index
    from sketch_env.photo_shards import INDEX_DIR, gallery_from_shards, load_photo_shards

    shards = load_photo_shards(gallery_dir)
    shards.check_network(embedding_run)
    gallery = gallery_from_shards(shards, None if split is None else split.photos,
                                  None if split is None else split.path,
                                  require=() if split is None or not require_targets else split.sketches.photo_id)
    if len(gallery) > EXACT_UP_TO:
        if (Path(gallery_dir) / INDEX_DIR).is_dir():
            gallery.use_index(load_index(Path(gallery_dir) / INDEX_DIR, shards.embedding))
        else:
            (log or print)(f"{gallery_dir}: no saved index for {len(gallery)} photos; building one in memory "
                           "(darp embed-photos --index ivfpq saves it with the shards)")
            gallery.use_index(build_index(shards.embedding, IndexConfig()))
    return gallery


def live_retrieval(run_dir: str | Path, split, cache_size: int = 4096, stop_at: float | None = None,
                   gallery_dir: str | Path | None = None):
    """The `LiveRetrieval` of DARP run `run_dir` over the photos of `split` (a `select_split` result).

    The gallery holds the phase-1 export's embeddings of the split's photos, looked up by id as in
    `darp evaluate` (`sketch_env.embedding_export.gallery_for`: photos whose image changed since the export are
    re-embedded); partial sketches are embedded by the run's phase-1 network. With `gallery_dir`, the
    gallery is every photo of those shards instead (`shards_gallery`). The answers carry the
    run's calibrated confidence (RUN/calibration.json, `policies.running.calibration.calibrate_run`) when it has one, "you
    can stop" from P(top-1 right) >= stop_at (default `policies.darp.rollout.STOP_AT`).
    """
    from policies.phase1.embedding import embed_photos, load_embedding_net
    from policies.darp.rollout import STOP_AT, LivePolicy, LiveRetrieval
    from sketch_env.embedding_export import gallery_for, load_embedding_export
    from sketch_env.env import EnvConfig

    run = read_darp_run(run_dir)
    if len(split.photos) == 0:
        raise DataError(f"{split.path}: the chosen split has no photos to retrieve")
    export = load_embedding_export(run["embedding"])
    net, _ = load_embedding_net(run["embedding"])
    if gallery_dir is not None:
        gallery = shards_gallery(gallery_dir, run["embedding"], split, require_targets=False)
    else:
        gallery = gallery_for(export, split.photos, run["embedding"], split.path, functools.partial(embed_photos, net))
    env_config = EnvConfig(**env_options(run))  # the glimpse geometry of make_env
    module = load_module(run_dir, *run_spaces(run))
    local_gallery = None
    if env_config.match != "global":  # the photos' local grids, looked up and checked as the gallery's embeddings
        if gallery_dir is not None:
            raise DataError(f"{run_dir}: a run in {env_config.match} match needs the photos' local grids, which "
                            "photo shards (--gallery) do not hold")
        from policies.phase1.embedding import embed_photo_grids
        from sketch_env.local_grids import load_local_grids, photo_grids_for
        from sketch_env.local_match import LocalGallery

        grids = photo_grids_for(load_local_grids(run["embedding"]), split.photos, run["embedding"],
                                functools.partial(embed_photo_grids, net))
        local_gallery = LocalGallery(grids)
    confidence = live_confidence(run_dir, len(gallery))
    return LiveRetrieval(LivePolicy(module, net, env_config), gallery, cache_size, confidence,
                         STOP_AT if stop_at is None else stop_at, local_gallery)


def live_confidence(run_dir: str | Path, gallery_size: int):
    """The run's calibrator for a live gallery of `gallery_size` photos, or None (said in one line)
    when the run has none; a gallery far from the size it was fitted on is said too, since more photos
    (more near misses) make the same distances less sure than they were where it was fitted."""
    from policies.running.runs import CALIBRATION_FILE, load_run_confidence

    confidence = load_run_confidence(run_dir)
    if confidence is None:
        print(f"{Path(run_dir) / CALIBRATION_FILE} does not exist: the page shows no confidence "
              f"(fit one with `darp calibrate --data DATA --run {run_dir}`)")
        return None
    fitted = confidence.info.get("fitted_on", {}).get("n_photos")
    if isinstance(fitted, int) and fitted > 0 and not 0.5 <= gallery_size / fitted <= 2.0:
        print(f"note: the confidence of {run_dir} was fitted with a gallery of {fitted} photos; this gallery has "
              f"{gallery_size}, so its probabilities are not calibrated for it (refit with darp calibrate on a "
              "split of this size)")
    return confidence
