"""Acting with a trained recurrent policy, in plain PyTorch: the one act step and the episodes built on it.

`policy_step` is the policy's one step on a batch of observations; everything that acts with a
trained module calls it:
- `run_episodes` / `rollout_ranks` step a `SketchRetrievalVectorEnv` through whole episodes on a
  chosen list of sketches and record, for every sketch and completion level, the rank of the true
  photo after the level's last glimpse (`PolicyValidator`: validation during training;
  `policies.running.trained.evaluate_policy_run`: `darp evaluate` and `darp report`);
- `policies.running.trained.TrainedPolicy` acts in a single env, one step at a time (`darp play`);
- `LivePolicy` is the incremental episode: one partial sketch in (the drawing after a new stroke),
  that level's glimpses and query out, with no precomputed episode data; `LiveRetrieval` ranks its
  queries against a gallery and caches the episode after every stroke (`darp serve`). Cut at
  `render.level_cut_points` a live episode is exactly the episode `darp evaluate` steps.
Observations are built by `sketch_env.env.build_observation` everywhere.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from ray.rllib.core.columns import Columns

from sketch_env.confidence import Confidence
from sketch_env.env import EnvConfig, build_observation
from sketch_env.gallery import Gallery
from sketch_env.geometry import location_to_unit, stroke_ends, unit_length
from sketch_env.glimpse import GlimpseSensor, integral_image
from sketch_env.locators import LOCATORS, InkTable
from sketch_env.metrics import retrieval_metrics
from sketch_env.render import N_LEVELS, render_points

TOP_K = 10
STOP_AT = 0.9  # the live page says "you can stop" from this P(top-1 right) on


def initial_state(module, batch_size: int) -> dict[str, torch.Tensor]:
    """The module's initial recurrent state for `batch_size` episodes (empty for a stateless module)."""
    return {k: torch.as_tensor(np.asarray(v)).unsqueeze(0).repeat(batch_size, *([1] * np.ndim(v)))
            for k, v in module.get_initial_state().items()}


def policy_step(module, obs: dict[str, torch.Tensor], state: dict, explore: bool = False) -> tuple[dict, dict]:
    """The policy's one step on B episodes: observations (B, ...) -> actions (B, ...) and the next state.

    Deterministic (forward_inference) unless `explore`. Actions are a dict of tensors (location
    (B, 2), query (B, D)) as the module returns them; the env clips both to [-1, 1].
    """
    batch = {Columns.OBS: {k: torch.as_tensor(v).unsqueeze(1) for k, v in obs.items()}, Columns.STATE_IN: state}
    out = (module.forward_exploration if explore else module.forward_inference)(batch)
    return {k: v[:, 0] for k, v in out[Columns.ACTIONS].items()}, out[Columns.STATE_OUT]


@dataclass
class Trace:
    """What one deterministic episode batch did: ranks per level and where the policy looked.

    ranks: (B, 17) rank after each level's last glimpse; locations: (B, 17, G, 2) glimpse centres;
    queries: (B, 17, D) the query after each level's last glimpse; on_ink: (B,) how many of the
    episode's chosen glimpses (all but the first, which is at the centre) had ink in their finest patch.
    """

    ranks: np.ndarray
    locations: np.ndarray
    queries: np.ndarray
    sketch_index: np.ndarray = field(default=None)
    on_ink: np.ndarray = field(default=None)


class FixedLocator:
    """A rule from `sketch_env.locators` that replaces the policy's locations (the rest of the policy
    acts as trained). Seeded: the same seed draws the same locations for the same episodes."""

    def __init__(self, rule: str, episodes, seed: int = 0):
        if rule not in LOCATORS:
            raise ValueError(f"unknown locator {rule!r}: choose from policy, {', '.join(LOCATORS)}")
        self.rule = rule
        self.table = InkTable.from_renders(episodes.images)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, sketch_index: np.ndarray, level: np.ndarray) -> np.ndarray:
        sketch = torch.as_tensor(np.asarray(sketch_index), dtype=torch.long)
        return self.table(self.rule, sketch, torch.as_tensor(np.asarray(level)), self.generator).numpy()


@torch.no_grad()
def run_episodes(module, env, sketch_index: np.ndarray, explore: bool = False,
                 locator: FixedLocator | None = None) -> Trace:
    """Step `env` (a SketchRetrievalVectorEnv) through one episode per sub-env on `sketch_index`.

    len(sketch_index) must equal env.num_envs. The policy acts deterministically unless `explore`.
    locator: a fixed rule that chooses every location instead of the policy.
    """
    B = env.num_envs
    if len(sketch_index) != B:
        raise ValueError(f"need one sketch per sub-env: got {len(sketch_index)} for {B} envs")
    G = env.config.n_glimpses
    T = N_LEVELS * G
    obs, info = env.reset(options={"sketch_index": np.asarray(sketch_index)})
    state = initial_state(module, B)
    ranks = np.zeros((B, N_LEVELS), np.int64)
    locations = np.zeros((B, N_LEVELS, G, 2), np.float32)
    on_ink = np.zeros(B, np.int64)
    queries = None
    for t in range(T):
        actions, state = policy_step(module, obs, state, explore)
        action = {k: v.numpy() for k, v in actions.items()}
        if locator is not None:  # the location chosen now is read at step t + 1, on that step's level
            action["location"] = locator(sketch_index, np.full(B, min((t + 1) // G, N_LEVELS - 1)))
        level, glimpse = np.asarray(obs["level"]), np.asarray(obs["glimpse_index"])
        obs, _, _, _, info = env.step(action)
        if t + 1 < T:
            on_ink += np.asarray(obs["glimpse"])[:, 0].reshape(B, -1).max(1) > 0
        locations[np.arange(B), level, glimpse] = action["location"]
        last = glimpse == G - 1
        ranks[last, level[last]] = np.asarray(info["rank"])[last]
        if queries is None:
            queries = np.zeros((B, N_LEVELS, action["query"].shape[-1]), np.float32)
        queries[last, level[last]] = action["query"][last]
    return Trace(ranks, locations, queries, np.asarray(sketch_index), on_ink)


@dataclass
class Rollout:
    """What `rollout_ranks` measured over a list of sketches.

    ranks: (S, 17); queries: (S, 17, D) after each level's last glimpse, clipped to [-1, 1] as the env
    clips them (what the ranks were computed from); on_ink: share of chosen glimpses whose finest patch
    holds ink; cells: (S,) distinct cells of an 8 x 8 grid over the canvas among each episode's chosen
    glimpse centres (how widely a locator spreads its evidence: 17 x G - 1 choices per episode).
    """

    ranks: np.ndarray
    queries: np.ndarray
    on_ink: float
    cells: np.ndarray


def distinct_cells(locations: np.ndarray, grid: int = 8) -> np.ndarray:
    """(B,) distinct cells of a grid x grid partition of the canvas among each episode's chosen glimpse
    centres; locations (B, 17, G, 2) in [-1, 1] as `run_episodes` records them (the last one is never read)."""
    chosen = locations.reshape(len(locations), -1, 2)[:, :-1]
    cell = np.clip(((chosen + 1) / 2 * grid).astype(np.int64), 0, grid - 1)
    flat = np.sort(cell[..., 1] * grid + cell[..., 0], axis=1)
    return (np.diff(flat, axis=1) != 0).sum(1) + 1


def rollout_ranks(module, env, sketch_index: np.ndarray, locator: FixedLocator | None = None) -> Rollout:
    """Ranks (S, 17) for all sketches in `sketch_index`, in chunks of env.num_envs, with the queries and
    where the glimpses went (`Rollout`)."""
    B = env.num_envs
    traces = []
    for start in range(0, len(sketch_index), B):
        chunk = np.asarray(sketch_index[start : start + B])
        padded = np.resize(chunk, B)  # repeat sketches to fill the last chunk
        trace = run_episodes(module, env, padded, locator=locator)
        traces.append((trace.ranks[: len(chunk)], np.clip(trace.queries[: len(chunk)], -1.0, 1.0),
                       trace.on_ink[: len(chunk)], distinct_cells(trace.locations[: len(chunk)])))
    if not traces:
        return Rollout(np.zeros((0, N_LEVELS), np.int64), np.zeros((0, N_LEVELS, 0), np.float32), float("nan"),
                       np.zeros(0, np.int64))
    ranks, queries, on_ink, cells = (np.concatenate(parts) for parts in zip(*traces))
    chosen = (N_LEVELS * env.config.n_glimpses - 1) * len(ranks)
    return Rollout(ranks, queries, float(on_ink.sum() / max(chosen, 1)), cells)


class PolicyValidator:
    """Evaluates module weights on a fixed split with a vector env built once."""

    def __init__(self, module, env, max_sketches: int = 0):
        self.module = module
        self.env = env
        n = len(env.episodes)
        self.sketch_index = np.arange(n if not max_sketches else min(n, max_sketches))

    @staticmethod
    def from_config(config) -> "PolicyValidator":
        """Build the val env and a local module from an (algorithm) config with env_config."""
        from sketch_env.vector_env import make_vector_env

        env_config = dict(config.env_config)
        env_config.update(split=config.val_split, sketch_order="sequential", num_envs=64)
        env = make_vector_env(env_config)
        spec = config.get_rl_module_spec()
        spec.observation_space = env.single_observation_space
        spec.action_space = env.single_action_space
        module = spec.build()
        module.eval()
        return PolicyValidator(module, env, config.val_max_sketches)

    def evaluate(self, module_state: dict) -> dict:
        self.module.set_state(module_state)
        ranks = rollout_ranks(self.module, self.env, self.sketch_index).ranks
        metrics = retrieval_metrics(ranks, len(self.env.episodes.gallery))
        return {k: v for k, v in metrics.items() if k != "percentile_curve"} | {
            f"percentile_level_{i:02d}": v for i, v in enumerate(metrics["percentile_curve"])
        }


# ---- the incremental episode: partial sketches drawn live ------------------------------------------


@dataclass(frozen=True)
class LevelState:
    """A live episode after one partial sketch: what the next level starts from and what it found.

    state: recurrent state after the level's last glimpse (tensors of batch 1); location: (2,)
    where the next glimpse looks; query: (D,) the query after the last glimpse, clipped to [-1, 1]
    as the env clips it; looked: (G, 2) the centres of this level's glimpses (sensor coordinates);
    grid: (h, w, d) the partial sketch's local descriptors in local and dense matches (else None);
    inked: (h * w,) bool, the grid cells that hold ink (dense-ink match).
    """

    state: dict
    location: torch.Tensor
    query: torch.Tensor
    looked: np.ndarray
    grid: torch.Tensor | None = None
    inked: torch.Tensor | None = None


class LivePolicy:
    """A trained policy on partial sketches drawn live: the incremental episode.

    module: a trained RLModule (set to eval mode here); embedding_net: its phase-1 EmbeddingNet;
    env_config: the environment it was trained in (glimpse geometry, image size, n_glimpses).
    `advance` takes one partial sketch per episode, renders it as the env's episodes are rendered,
    embeds it with the phase-1 network and takes the level's G glimpses, carrying the recurrent
    state from the episode's previous level: what `SketchRetrievalEnv` does with precomputed levels.
    """

    def __init__(self, module, embedding_net, env_config: EnvConfig):
        self.module = module.eval()
        self.net = embedding_net.eval()
        self.config = env_config
        self.sensor = GlimpseSensor(env_config.glimpse_size, env_config.n_patches, env_config.patch_scale)

    @torch.inference_mode()
    def advance(self, steps: Sequence[tuple[LevelState | None, np.ndarray, int]]) -> list[LevelState]:
        """One level of B episodes at once, in one batch.

        steps[b] = (previous, partial, level): episode b continues from `previous` (None: a new
        episode, looking at the centre) on the partial sketch `partial` (n, 3) points at `level`.
        """
        B, G = len(steps), self.config.n_glimpses
        sizes = {self.config.image_size, self.net.config.image_size}
        rendered = {s: torch.from_numpy(np.stack([render_points(p, s) for _, p, _ in steps])) for s in sizes}
        embedding = self.net.embed_sketches(rendered[self.net.config.image_size][:, None])  # (B, D)
        grids = None
        if self.config.match != "global":  # stored as the export stores them (float16)
            grids = self.net.local_head(self.net.feature_map(rendered[self.net.config.image_size][:, None].float()))
            grids = grids.to(torch.float16).to(torch.float32)
        integral = integral_image(rendered[self.config.image_size])
        inked = None
        if grids is not None:
            from sketch_env.local_match import inked_cells

            inked = inked_cells(rendered[self.config.image_size], grids.shape[1], grids.shape[2])
        fresh = initial_state(self.module, 1)
        states = [fresh if previous is None else previous.state for previous, _, _ in steps]
        state = {k: torch.cat([s[k] for s in states]) for k in fresh}
        location = torch.stack([torch.zeros(2) if previous is None else previous.location for previous, _, _ in steps])
        level = torch.tensor([lv for _, _, lv in steps], dtype=torch.long)
        looked = torch.zeros(B, G, 2)
        for g in range(G):
            looked[:, g] = location
            obs = build_observation(self.sensor, integral, location, level, torch.full((B,), g), embedding, grids)
            actions, state = policy_step(self.module, obs, state)
            location = actions["location"].clamp(-1.0, 1.0)
        query = actions["query"].clamp(-1.0, 1.0)
        return [  # clones: a view would keep the whole batch alive in the cache
            LevelState({k: v[b : b + 1].clone() for k, v in state.items()}, location[b].clone(), query[b].clone(),
                       looked[b].numpy().copy(), None if grids is None else grids[b].clone(),
                       None if inked is None else inked[b].clone())
            for b in range(B)
        ]

    def episode(self, points: np.ndarray, cuts: np.ndarray) -> list[LevelState]:
        """One sketch through partial sketches points[:cuts[0]], points[:cuts[1]], ...; the i-th is level min(i, 16).

        With cuts = `render.level_cut_points(len(points))` this is the episode `darp evaluate` steps.
        """
        levels: list[LevelState] = []
        for i, cut in enumerate(_checked_cuts(cuts, len(points)).tolist()):
            levels += self.advance([(levels[-1] if levels else None, points[:cut], min(i, N_LEVELS - 1))])
        return levels


def _checked_cuts(cuts, n_points: int) -> np.ndarray:
    cuts = np.asarray(cuts, np.int64)
    if cuts.ndim != 1 or len(cuts) == 0 or cuts[0] < 1 or cuts[-1] > n_points or np.any(np.diff(cuts) < 1):
        raise ValueError(f"cuts must be increasing point counts in [1, {n_points}], got {cuts.tolist()}")
    return cuts


@dataclass
class Drawing:
    """One drawing being answered: its points, one cut per stroke, and the levels found so far.

    points: (P, 3) in [0, 1]; cuts: (L,) point counts ending each stroke; keys: (L,) cache keys of
    the partial sketches; levels: the LevelStates of the first len(levels) partial sketches (from
    the cache or computed); target: the target photo's gallery row, or None.
    """

    points: np.ndarray
    cuts: np.ndarray
    keys: list[bytes]
    target: int | None
    levels: list[LevelState] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        """Whether partial sketches are left to compute."""
        return len(self.levels) < len(self.cuts)

    def next_step(self) -> tuple[LevelState | None, np.ndarray, int]:
        """The next partial sketch as a `LivePolicy.advance` step."""
        i = len(self.levels)
        return (self.levels[-1] if self.levels else None, self.points[: self.cuts[i]], min(i, N_LEVELS - 1))


class LiveRetrieval:
    """Drawings -> a trained policy's queries ranked against a gallery, stroke by stroke.

    The partial sketch after stroke k + 1 is episode level min(k, 16) (a drawing with more than
    17 strokes stays at level 16). Every answer depends only on the points sent (no sessions): the
    LevelState after each partial sketch is cached under a hash chain of the points up to it
    (`cache_size` states, least recently used dropped), so a new stroke costs one level and a
    drawing the cache has not seen is replayed from its longest cached prefix. The target's rank after
    each level is cached too, so an answer ranks only what is new.

    One drawing at a time: `query`. Many at once (the server's batches): `start` each, then `step`
    them together (one level each for the pending ones in one batch, then one ranking pass for the
    finished ones) until each has its answer. `start` and `step` may run in different threads.

    In local and dense match (the policy's env config) `local_gallery` holds the gallery's photo grids
    and every rank adds the level's local term, as the environment's does (`local_term`).
    """

    def __init__(self, policy: LivePolicy, gallery: Gallery, cache_size: int = 4096,
                 confidence: Confidence | None = None, stop_at: float = STOP_AT, local_gallery=None):
        if policy.config.match != "global" and local_gallery is None:
            raise ValueError(f"match={policy.config.match!r} needs the gallery's local grids (local_gallery)")
        self.policy = policy
        self.gallery = gallery
        self.local_gallery = local_gallery if policy.config.match != "global" else None
        self.cache_size = cache_size
        self.confidence = confidence
        self.stop_at = stop_at
        self._cache: OrderedDict[bytes, LevelState] = OrderedDict()
        self._ranks: OrderedDict[tuple[bytes, int], int] = OrderedDict()  # (level key, target row) -> rank
        self._confidences: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # level key -> (P(top 1), P(top 5))
        self._lock = threading.Lock()

    @property
    def config(self) -> EnvConfig:
        return self.policy.config

    def start(self, points: np.ndarray, target: str | None = None) -> Drawing:
        """A drawing of `points` (P, 3) x, y in [0, 1] (y down) and pen, with its cached levels filled in.

        target: a gallery photo id or None (KeyError for an id not in the gallery).
        """
        points = np.ascontiguousarray(points, np.float32)
        cuts = stroke_ends(points)
        keys, key, start = [], b"", 0
        for cut in cuts.tolist():
            key = hashlib.sha256(key + cut.to_bytes(8, "little") + points[start:cut].tobytes()).digest()
            keys.append(key)
            start = cut
        row = None if target is None else int(self.gallery.index_of([target])[0])
        drawing = Drawing(points, cuts, keys, row)
        with self._lock:
            for key in keys:
                found = self._cache.get(key)
                if found is None:
                    break
                self._cache.move_to_end(key)
                drawing.levels.append(found)
        return drawing

    def advance(self, drawings: Sequence[Drawing]) -> None:
        """Compute the next level of every drawing (all pending), in one batch, and cache it."""
        if not all(d.pending for d in drawings):
            raise ValueError("advance() takes pending drawings only: a finished one has no next level")
        results = self.policy.advance([d.next_step() for d in drawings])
        with self._lock:
            for drawing, result in zip(drawings, results):
                self._cache[drawing.keys[len(drawing.levels)]] = result
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                drawing.levels.append(result)

    @torch.inference_mode()
    def answer(self, drawings: Sequence[Drawing]) -> list[dict]:
        """The answers of finished drawings, ranked in one pass.

        Each: {"top": [(photo_id, rank, squared distance)] x min(10, N) for the last query,
        "glimpses": (G, 2) centres of the last level's glimpses and "glimpse_sides": (n_patches,)
        patch sides, both in sketch units, "level", "n_strokes", "target_rank" (int or None),
        "target_ranks" (one per stroke, or None), and with a calibrated `confidence` (else None):
        "confidence" (P(top-1 right), P(in the top 5)) after the last stroke, "confidences" (P(top-1
        right) after each stroke) and "stop_stroke" (the first stroke, from 1, where it reached
        `stop_at`, or None)}.
        """
        if any(d.pending for d in drawings):
            raise ValueError("answer() needs finished drawings: advance() the pending ones first")
        k = min(TOP_K, len(self.gallery))
        last = [d.levels[-1] for d in drawings]
        top, distance, top_rank = self.gallery.ranked_topk(torch.stack([lv.query for lv in last]), k, extra=self.local_term(last))
        target_ranks = self._target_ranks([d for d in drawings if d.target is not None])
        confidences = None
        if self.confidence is not None:  # the last levels' global distances are the ones just computed
            known = {} if self.local_gallery is not None else {d.keys[-1]: distance[i] for i, d in enumerate(drawings)}
            confidences = self._level_confidences(drawings, known)
        cfg = self.config
        sides = unit_length(cfg.glimpse_size * cfg.patch_scale ** np.arange(cfg.n_patches), cfg.image_size)
        answers = []
        for i, d in enumerate(drawings):
            ranks = [target_ranks[key, d.target] for key in d.keys] if d.target is not None else None
            answers.append({
                "top": [(self.gallery.photo_ids[j], int(r), float(s))
                        for j, r, s in zip(top[i].tolist(), top_rank[i].tolist(), distance[i].tolist())],
                "glimpses": location_to_unit(d.levels[-1].looked, cfg.image_size),
                "glimpse_sides": sides,
                "level": min(len(d.levels) - 1, N_LEVELS - 1),
                "n_strokes": len(d.levels),
                "target_rank": None if ranks is None else ranks[-1],
                "target_ranks": ranks,
                **self._confidence_answer(d, confidences),
            })
        return answers

    def _confidence_answer(self, drawing: Drawing, confidences: dict | None) -> dict:
        if confidences is None:
            return {"confidence": None, "confidences": None, "stop_stroke": None}
        per_stroke = [confidences[key] for key in drawing.keys]
        reached = [i + 1 for i, (p1, _) in enumerate(per_stroke) if p1 >= self.stop_at]
        return {"confidence": per_stroke[-1], "confidences": [p1 for p1, _ in per_stroke],
                "stop_stroke": reached[0] if reached else None}

    def _level_confidences(self, drawings: Sequence[Drawing], known: dict[bytes, torch.Tensor]) -> dict[bytes, tuple[float, float]]:
        """{level key: (P(top-1 right), P(in the top 5))} for every level of `drawings`, from the
        calibrated confidence of the level's top-k distances (`known`: those already computed, by level
        key); cached like the ranks, the other new ones in one `Gallery.topk` pass."""
        found, todo = {}, {}
        with self._lock:
            for d in drawings:
                for key, level in zip(d.keys, d.levels):
                    value = self._confidences.get(key)
                    if value is None:
                        todo[key] = level.query
                    else:
                        found[key] = value
        if todo:
            missing = [key for key in todo if key not in known]
            if missing:
                _, distances = self.gallery.topk(torch.stack([todo[key] for key in missing]), min(TOP_K, len(self.gallery)))
                known = {**known, **dict(zip(missing, distances))}
            p1, p5 = self.confidence.predict(torch.stack([known[key] for key in todo]).cpu().numpy())
            fresh = {key: (float(a), float(b)) for key, a, b in zip(todo, p1, p5)}
            found.update(fresh)
            with self._lock:
                self._confidences.update(fresh)
                while len(self._confidences) > self.cache_size:
                    self._confidences.popitem(last=False)
        return found

    def local_term(self, levels: Sequence[LevelState]) -> torch.Tensor | None:
        """(B, N) what the environment adds to the squared distances after these levels' last glimpse: the
        weighted mean local distance at the cells the level's glimpses looked at (local), at every cell
        (dense) or every inked cell (dense-ink); None in global match."""
        if self.local_gallery is None:
            return None
        from sketch_env.local_match import cell_of

        grids = torch.stack([lv.grid for lv in levels])  # (B, h, w, d)
        if self.config.match == "dense":
            distance = self.local_gallery.dense_distance(grids)
        elif self.config.match == "dense-ink":
            distance = self.local_gallery.dense_distance(grids, torch.stack([lv.inked for lv in levels]))
        else:
            b, h, w, d = grids.shape
            looked = torch.as_tensor(np.stack([lv.looked for lv in levels]), dtype=torch.float32)  # (B, G, 2)
            g = looked.shape[1]
            cells = cell_of(looked.reshape(-1, 2), h, w)
            descriptors = grids.reshape(b, h * w, d).repeat_interleave(g, 0)[torch.arange(b * g), cells]
            distance = self.local_gallery.distance_at(descriptors, cells).view(b, g, -1).mean(1)
        return self.config.local_weight * distance

    def _target_ranks(self, drawings: Sequence[Drawing]) -> dict[tuple[bytes, int], int]:
        """{(level key, target row): the target's rank after that level} for every level of `drawings`;
        ranks computed before come from the cache, the others in one `Gallery.rank` pass."""
        found, todo = {}, []
        with self._lock:
            for d in drawings:
                for key, level in zip(d.keys, d.levels):
                    rank = self._ranks.get((key, d.target))
                    if rank is None:
                        todo.append(((key, d.target), level))
                    else:
                        found[key, d.target] = rank
        if todo:
            levels = [level for _, level in todo]
            ranks = self.gallery.rank(torch.stack([lv.query for lv in levels]), torch.tensor([t for (_, t), _ in todo]),
                                      self.local_term(levels))
            found.update(zip([name for name, _ in todo], ranks.tolist()))
            with self._lock:
                for name, _ in todo:
                    self._ranks[name] = found[name]
                while len(self._ranks) > self.cache_size:
                    self._ranks.popitem(last=False)
        return found

    def step(self, drawings: Sequence[Drawing]) -> list[dict | None]:
        """One round for many drawings: the next level of the pending ones (one batch), then the
        answers of those now finished (one ranking pass); None for a drawing still pending."""
        pending = [d for d in drawings if d.pending]
        if pending:
            self.advance(pending)
        finished = [d for d in drawings if not d.pending]
        answers = dict(zip(map(id, finished), self.answer(finished))) if finished else {}
        return [answers.get(id(d)) for d in drawings]

    def query(self, points: np.ndarray, target: str | None = None) -> dict:
        """Rank the gallery for one drawing (see `start` and `answer`)."""
        drawing = self.start(points, target)
        while (answer := self.step([drawing])[0]) is None:
            pass
        return answer
