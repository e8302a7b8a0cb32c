"""`darp play`: step one episode of SketchRetrieval-v0 by hand in the terminal.

Each step prints the level, the glimpse, where the agent looks next, the target's rank and the
reward. At the prompt, type a location "x y" (each in [-1, 1]; -1 is the left/top edge) to look
there, press Enter to let the policy choose, or type q to stop. When stdin is not a terminal the
same answers are read line by line (end of input: the policy plays on). Every frame is saved as a
PNG and the episode as an animated GIF.

The query (the predicted sketch embedding) always comes from the policy: for "random" (uniform
locations) and "center" (always (0, 0)) it is the phase-1 embedding of the current partial sketch;
a run directory acts with its trained policy (`policies.running.trained.TrainedPolicy`, loaded safely), in
the environment it trained in (its match mode too: in local match the ranks follow where you look).

    darp play --data DIR --embedding RUN [--policy random|center|RUN] [--sketch ID]

The options are policies.running.hand_play.PlayConfig's; the engine is policies.running.hand_play.play_episode.
"""

from __future__ import annotations

from policies.running.hand_play import PlayConfig, play_episode

__all__ = ["PlayConfig", "run"]


def run(cfg: PlayConfig) -> int:
    """Play one episode (`policies.running.hand_play.play_episode`)."""
    play_episode(cfg)
    return 0
