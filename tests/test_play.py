"""`darp play` with piped input on the synthetic fixture."""

from __future__ import annotations

import io
import re
import sys

import numpy as np
import pytest
from PIL import Image

from sketch_env.atomic import prepare_output_dir
from sketch_env.data import DataError
from policies.running.hand_play import FRAMES_KIND, PlayConfig, play_episode
from tune_runs.cli import main


def play(monkeypatch, capsys, stdin: str, **options) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    play_episode(PlayConfig(**options))
    return capsys.readouterr().out


def step_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"step +\d+ ", line)]


def test_typed_locations_enter_bad_input_and_quit(synthetic, tmp_path, monkeypatch, capsys):
    data, run_dir = synthetic
    out_dir = tmp_path / "frames"
    prepare_output_dir(out_dir, FRAMES_KIND)  # an earlier play's folder
    (out_dir / "frame_007.png").write_bytes(b"a frame of an earlier, longer play")
    (out_dir / "notes.txt").write_text("not ours")
    stdin = "0.5 -0.25\n\nfoo\n2 0\n-1,1\nq\n"
    out = play(monkeypatch, capsys, stdin, data=data, embedding=run_dir, split="all", out=str(out_dir), policy="center")
    steps = step_lines(out)
    assert len(steps) == 3
    assert "level  1/17  glimpse  1/12  next look (+0.50, -0.25)" in steps[0]
    assert "glimpse  2/12  next look (+0.00, +0.00)" in steps[1]  # Enter: the centre policy acted
    assert "next look (-1.00, +1.00)" in steps[2]
    assert "expected 'x y'" in out and "must lie in [-1, 1]" in out
    assert re.search(r"rank +\d+/10 +reward [+-]\d\.\d{3}", steps[0])
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == ["frame_000.png", "frame_001.png", "frame_002.png", "frame_003.png"]
    assert (out_dir / "notes.txt").is_file()
    with Image.open(out_dir / "episode.gif") as gif:
        assert gif.n_frames == 4
    with Image.open(out_dir / "frame_001.png") as frame:
        assert frame.mode == "RGB" and frame.width > 256


def test_end_of_input_lets_the_policy_play_until_max_steps(synthetic, tmp_path, monkeypatch, capsys):
    data, run_dir = synthetic
    out = play(
        monkeypatch, capsys, "", data=data, embedding=run_dir, split="all", out=str(tmp_path / "f"), max_steps=30, seed=3
    )
    steps = step_lines(out)
    assert len(steps) == 30 and "level  3/17  glimpse  6/12" in steps[-1]
    looks = {re.search(r"next look (\S+, \S+)", line).group(1) for line in steps}
    assert len(looks) == 30  # the random policy looks somewhere new every step


@pytest.mark.slow
def test_chosen_sketch_and_whole_episode(synthetic, tmp_path, monkeypatch, capsys):
    data, run_dir = synthetic
    out = play(monkeypatch, capsys, "", data=data, embedding=run_dir, split="all", out=str(tmp_path / "f"),
               sketch="/train/chair03_2")
    assert out.startswith("sketch /train/chair03_2 (photo chair03)")
    assert len(step_lines(out)) == 17 * 12 and "level 17/17  glimpse 12/12" in step_lines(out)[-1]
    with pytest.raises(DataError, match="no sketch 'nope' in split 'all'"):
        play(monkeypatch, capsys, "", data=data, embedding=run_dir, split="all", sketch="nope", out=str(tmp_path / "no"))
    assert not (tmp_path / "no").exists(), "a refused sketch leaves no output folder behind"


def test_a_trained_run_acts_with_its_module_and_carries_its_state(synthetic, tmp_path, monkeypatch, capsys):
    """--policy RUN loads the run (safely) and acts with its module: the printed looks are the module's
    own deterministic steps, recurrent state carried, in an env with the run's glimpses per level."""
    import torch

    from policies.darp.rollout import initial_state, policy_step
    from sketch_env.env import EnvConfig, SketchRetrievalEnv
    from tests.rl_fixtures import save_untrained_run
    from policies.running.trained import load_module

    data, run_dir = synthetic
    trained = save_untrained_run(tmp_path / "darp_run", data, run_dir, n_glimpses=2)
    out = play(monkeypatch, capsys, "\n\n0.5 0.5\n\n", data=data, embedding=run_dir, split="all",
               out=str(tmp_path / "f"), policy=str(trained), max_steps=4, seed=1)
    assert "17 levels x 2 glimpses" in out, "the env must take the trained run's glimpses per level"
    printed = [tuple(float(v) for v in re.search(r"next look \((\S+), (\S+)\)", line).groups()) for line in step_lines(out)]

    env = SketchRetrievalEnv(EnvConfig(data=data, embedding=run_dir, split="all", n_glimpses=2))
    module = load_module(trained, env.observation_space, env.action_space)
    obs, _ = env.reset(seed=1)
    state, expected = initial_state(module, 1), []
    for step in range(4):
        with torch.no_grad():
            action, state = policy_step(module, {k: torch.as_tensor(np.asarray(v))[None] for k, v in obs.items()}, state)
        location = np.array([0.5, 0.5], np.float32) if step == 2 else action["location"][0].numpy()
        obs, *_ = env.step({"location": location, "query": action["query"][0].numpy()})
        expected.append(tuple(obs["location"]))
    np.testing.assert_allclose(printed, expected, atol=0.006)  # printed with two decimals
    assert len(set(printed)) == 4, "the policy must not look at one place only (the state must move)"
    with pytest.raises(DataError, match="not 'random', 'center' or an existing run directory"):
        play(monkeypatch, capsys, "", data=data, embedding=run_dir, policy=str(tmp_path / "missing"),
             out=str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists(), "a refused policy leaves no output folder behind"


def test_darp_play_command_line(synthetic, tmp_path, monkeypatch, capsys):
    data, run_dir = synthetic
    monkeypatch.setattr(sys, "stdin", io.StringIO("0 0\nq\n"))
    code = main(["play", "--data", data, "--embedding", run_dir, "--split", "train", "--out", str(tmp_path / "cli")])
    assert code == 0 and len(step_lines(capsys.readouterr().out)) == 1
    assert (tmp_path / "cli" / "episode.gif").is_file()
