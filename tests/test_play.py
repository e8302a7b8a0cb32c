"""`darp play` with piped input on the synthetic fixture."""

from __future__ import annotations

import io
import re
import sys
import types

import numpy as np
import pytest
from PIL import Image

from sketch_env.data import DataError
from tune_runs.cli import main
from tune_runs.play import PlayConfig, run
from tests.test_env import DIM, synthetic  # noqa: F401  (fixture)


def play(monkeypatch, capsys, stdin: str, **options) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert run(PlayConfig(**options)) == 0
    return capsys.readouterr().out


def step_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"step +\d+ ", line)]


def test_typed_locations_enter_bad_input_and_quit(synthetic, tmp_path, monkeypatch, capsys):
    data, run_dir = synthetic
    out_dir = tmp_path / "frames"
    out_dir.mkdir()
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
        play(monkeypatch, capsys, "", data=data, embedding=run_dir, split="all", sketch="nope")


def test_a_trained_run_acts_through_load_policy(synthetic, tmp_path, monkeypatch, capsys):
    """A run directory is handed to tune_runs.rl_eval.load_policy; its state goes round the loop."""
    data, run_dir = synthetic
    calls = []

    class Recorder:
        def initial_state(self):
            return 0

        def act(self, obs, state):
            calls.append(state)
            return {"location": np.array([0.25, 0.75], np.float32), "query": np.zeros(DIM, np.float32)}, state + 1

    fake = types.ModuleType("tune_runs.rl_eval")
    fake.load_policy = lambda path: Recorder()
    fake.read_run = lambda path: {"config": {"n_glimpses": 2, "reward": "rank_gain"}}
    monkeypatch.setitem(sys.modules, "tune_runs.rl_eval", fake)
    trained = tmp_path / "darp_run"
    trained.mkdir()
    out = play(monkeypatch, capsys, "\n\n", data=data, embedding=run_dir, split="all", out=str(tmp_path / "f"),
               policy=str(trained), max_steps=3)
    assert calls == [0, 1, 2]
    assert "17 levels x 2 glimpses" in out, "the env must take the trained run's glimpses per level"
    assert all("next look (+0.25, +0.75)" in line for line in step_lines(out))
    with pytest.raises(DataError, match="not 'random', 'center' or an existing run directory"):
        play(monkeypatch, capsys, "", data=data, embedding=run_dir, policy=str(tmp_path / "missing"))


def test_darp_play_command_line(synthetic, tmp_path, monkeypatch, capsys):
    data, run_dir = synthetic
    monkeypatch.setattr(sys, "stdin", io.StringIO("0 0\nq\n"))
    code = main(["play", "--data", data, "--embedding", run_dir, "--split", "train", "--out", str(tmp_path / "cli")])
    assert code == 0 and len(step_lines(capsys.readouterr().out)) == 1
    assert (tmp_path / "cli" / "episode.gif").is_file()
