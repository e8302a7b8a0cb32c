"""The supervised term of the hybrid loss, shared by every learner that trains an action network.

Two objectives for the query a_t (config `sup_loss`):
- "mse": ||a_t - e_target||^2, the paper's regression onto the target embedding.
- "infonce": cross-entropy of the target photo among the training gallery, logits -||a_t - g_j||^2 / tau.
  Why: retrieval only cares about the target's rank among the photos, and phase-1 embeddings sit close
  together on the unit sphere, so a squared error is tiny everywhere and barely tells near-misses
  from hits; the softmax over the gallery pushes the query towards its photo *and away from the ones
  that outrank it*. tau is `sup_temperature` x the gallery's mean squared pairwise distance, so one
  setting means the same for any embedding.

The learner connector `AddTargetEmbeddings` brings what the loss needs into the train batch (the
policy never sees it): the env's infos carry row indices only (the target photo's gallery row, the
sketch's row), and the connector looks the target embeddings up in a table the learner loads once,
so episodes shipped from remote EnvRunners do not carry two embeddings per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.utils.annotations import override

TARGET_EMBEDDING = "target_embedding"
TARGET_INDEX = "target_index"
SUPERVISED_TARGETS = {"photo": "target_index", "final_sketch": "sketch_index"}  # target -> the info row indexing its table
SUPERVISED_LOSSES = ("mse", "infonce")


class AddTargetEmbeddings(ConnectorV2):
    """Learner connector: each step's supervised target, looked up from the infos' row indices.

    `target` "photo" regresses a_t onto the true photo's embedding (`table`: the training gallery's
    embeddings, indexed by the infos' target_index), "final_sketch" onto the phase-1 embedding of
    the finished sketch (the paper's "predicted final sketch embedding"; `table`: one row per
    training sketch, indexed by sketch_index). The target photo's gallery row also goes into
    TARGET_INDEX for the "infonce" loss.
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *, table=None, target: str = "photo"):
        super().__init__(input_observation_space, input_action_space)
        if target not in SUPERVISED_TARGETS:
            raise ValueError(f"supervised target must be one of {sorted(SUPERVISED_TARGETS)}, got {target!r}")
        if table is None or np.ndim(table) != 2:
            raise ValueError("AddTargetEmbeddings needs `table`, the (rows, D) embeddings its target indexes")
        self.info_key = SUPERVISED_TARGETS[target]
        self.table = np.asarray(table, np.float32)

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs):
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            infos = episode.get_infos(slice(0, len(episode)))
            rows = np.array([info[self.info_key] for info in infos], np.int64)
            if len(rows) and (rows.min() < 0 or rows.max() >= len(self.table)):
                raise ValueError(
                    f"infos' {self.info_key} reaches row {rows.max()} of a {len(self.table)}-row target table: "
                    "the learner loaded another split or data set than the EnvRunners"
                )
            targets = self.table[rows]
            index = np.array([info[TARGET_INDEX] for info in infos], np.int64)
            n = len(episode)
            self.add_n_batch_items(batch, TARGET_EMBEDDING, items_to_add=targets, num_items=n, single_agent_episode=episode)
            self.add_n_batch_items(batch, TARGET_INDEX, items_to_add=index, num_items=n, single_agent_episode=episode)
        return batch


def build_supervised_term(learner) -> "SupervisedObjective":
    """For a Learner's build(): bring the targets into its train batches and return its objective.

    Both halves follow the same config (sup_target, sup_loss, env_config's data, embedding and
    split: the EnvRunners' training split), so every learner sets them up here.
    """
    from sketch_env.episodes import load_supervised_targets

    config = learner.config
    env = config.env_config
    if not env.get("data") or not env.get("embedding"):
        raise ValueError("the supervised term needs env_config 'data' and 'embedding' to load its targets")
    gallery, complete_sketch = load_supervised_targets(env["data"], env["embedding"], env.get("split", "train"))
    if config.add_default_connectors_to_learner_pipeline:
        table = gallery.embeddings if config.sup_target == "photo" else complete_sketch
        learner._learner_connector.prepend(AddTargetEmbeddings(table=table.numpy(), target=config.sup_target))
    return SupervisedObjective.from_config(config, gallery)


@dataclass
class SupervisedObjective:
    """loss(query (..., D), batch, mask (...) or None) -> scalar mean over valid steps.

    kind: "mse" or "infonce"; gallery: (N, D) photo embeddings the target index refers to (infonce);
    temperature: tau relative to the gallery's mean squared pairwise distance (infonce).
    """

    kind: str = "mse"
    gallery: torch.Tensor | None = None
    temperature: float = 0.2
    tau: float = field(init=False, default=1.0)

    def __post_init__(self):
        if self.kind not in SUPERVISED_LOSSES:
            raise ValueError(f"sup_loss must be one of {SUPERVISED_LOSSES}, got {self.kind!r}")
        if self.kind == "infonce":
            if self.gallery is None or len(self.gallery) < 2:
                raise ValueError("the infonce loss needs a gallery of at least 2 photos")
            if self.temperature <= 0:
                raise ValueError(f"sup_temperature must be > 0, got {self.temperature}")
            g = self.gallery.float()
            n = len(g)
            mean_d2 = (torch.cdist(g, g) ** 2).sum().item() / (n * (n - 1))
            self.tau = self.temperature * max(mean_d2, 1e-8)

    @classmethod
    def from_config(cls, config, gallery) -> "SupervisedObjective":
        """From an AlgorithmConfig with sup_loss / sup_temperature and the training split's Gallery."""
        kind = getattr(config, "sup_loss", "mse")
        if kind == "mse":
            return cls()
        return cls(kind, gallery.embeddings.float(), float(config.sup_temperature))

    def __call__(self, query: torch.Tensor, batch: dict, mask: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "mse":
            error = ((query - batch[TARGET_EMBEDDING]) ** 2).sum(-1)
        else:
            if self.gallery.device != query.device:
                self.gallery = self.gallery.to(query.device)
            g = self.gallery
            flat = query.reshape(-1, query.shape[-1])
            d2 = (flat**2).sum(-1, keepdim=True) - 2.0 * flat @ g.T + (g**2).sum(-1)
            target = batch[TARGET_INDEX].reshape(-1).long()
            error = F.cross_entropy(-d2 / self.tau, target, reduction="none").reshape(query.shape[:-1])
        if mask is None:
            return error.mean()
        mask = mask.float()
        return (error * mask).sum() / mask.sum().clamp(min=1.0)


__all__ = [
    "AddTargetEmbeddings",
    "SUPERVISED_LOSSES",
    "SUPERVISED_TARGETS",
    "SupervisedObjective",
    "TARGET_EMBEDDING",
    "TARGET_INDEX",
    "build_supervised_term",
]
