"""Hand-made observation spaces, batches and recurrent states for DARP-style RLModules (no env, no Ray)."""

import gymnasium as gym
import numpy as np
import torch

from policies.darp.module import DARPModule

D, K, G = 16, 4, 3


def spaces():
    obs = gym.spaces.Dict(
        {
            "glimpse": gym.spaces.Box(0, 1, (2, 8, 8), np.float32),
            "location": gym.spaces.Box(-1, 1, (2,), np.float32),
            "level": gym.spaces.Discrete(17),
            "glimpse_index": gym.spaces.Discrete(G),
            "sketch_embedding": gym.spaces.Box(-1, 1, (D,), np.float32),
        }
    )
    act = gym.spaces.Dict(
        {"location": gym.spaces.Box(-1, 1, (2,), np.float32), "query": gym.spaces.Box(-1, 1, (D,), np.float32)}
    )
    return obs, act


def make_module(**cfg):
    obs, act = spaces()
    cfg = {"n_heads": K, "hidden": 32, "glimpse_hidden": 16, "std": 0.2, **cfg}
    return DARPModule(observation_space=obs, action_space=act, model_config=cfg)


def batch(B, T, start=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    level = torch.zeros(B, T, dtype=torch.long) if start else torch.full((B, T), 3)
    obs = {
        "glimpse": torch.rand(B, T, 2, 8, 8, generator=g),
        "location": torch.rand(B, T, 2, generator=g) * 2 - 1,
        "level": level,
        "glimpse_index": torch.zeros(B, T, dtype=torch.long) if start else torch.ones(B, T, dtype=torch.long),
        "sketch_embedding": torch.nn.functional.normalize(torch.randn(B, T, D, generator=g), dim=-1),
    }
    return obs


def state(module, B):
    return {k: torch.as_tensor(np.asarray(v)).unsqueeze(0).repeat(B, *([1] * np.ndim(v)))
            for k, v in module.get_initial_state().items()}
