"""Outputs never destroy other work: the checked output directory (sketch_env/atomic.py) in every
command that writes one, modes from the umask, `--out .`, and one-line errors for unwritable outputs."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sketch_env.atomic import STAMP, OutputKind, atomic_write_json, check_output_dir, prepare_output_dir, replace_dir
from sketch_env.data import DataError, load_dataset
from sketch_env.data.generate import generate_dataset
from sketch_env.data.qmul import import_qmul
from tune_runs.cli import main

GENERATE = ["data", "generate", "--photos", "2", "--sketches-per-photo", "1"]


def qmul_inputs(root: Path) -> tuple[Path, Path]:
    """A coordinate pickle of two sketches and its photo directory under `root`."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    coords = {}
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(photos / f"{name}.png")
        pts = np.zeros((6, 3))
        pts[:, 0], pts[:, 1], pts[-1, 2] = np.linspace(20, 200, 6), np.linspace(30, 220, 6), 1
        coords[f"/train/{name}_1"] = pts
    path = root / "inputs" / "coords.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(coords))
    return path, photos


def other_work(path: Path) -> dict[str, bytes]:
    """A directory of someone's work (runs and notes, none of them at the top where a command's own
    output would be); returns its files' contents."""
    (path / "runs" / "phase1").mkdir(parents=True)
    (path / "runs" / "phase1" / "run.json").write_text('{"kind": "triplet"}')
    (path / "notes.txt").write_text("three weeks of notes")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(capsys, *needles: str) -> str:
    """The command's error line (libraries may log warnings around it), with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


# ---------------------------------------------------------------- data sets


def test_import_refuses_a_directory_of_other_work_unless_forced(tmp_path, capsys):
    coords, photos = qmul_inputs(tmp_path)
    out = tmp_path / "work"
    before = other_work(out)
    argv = ["data", "import-qmul", "--coords", str(coords), "--photos", str(photos), "--out", str(out)]
    assert main(argv) == 1
    one_line_error(capsys, str(out), "holds other work (notes.txt, runs) and no data set written by darp", "--force")
    assert snapshot(out) == before
    assert main(argv + ["--force"]) == 0
    assert len(load_dataset(out).sketches) == 2 and not (out / "notes.txt").exists()


def test_generate_refuses_other_work_and_a_file_unless_forced(tmp_path, capsys):
    work = tmp_path / "work"
    before = other_work(work)
    assert main(GENERATE + ["--out", str(work)]) == 1
    one_line_error(capsys, "holds other work")
    assert snapshot(work) == before
    file = tmp_path / "file"
    file.write_text("mine")
    assert main(GENERATE + ["--out", str(file)]) == 1
    one_line_error(capsys, "a file is there")
    assert file.read_text() == "mine"
    assert main(GENERATE + ["--out", str(file), "--force"]) == 0
    assert len(load_dataset(file).photos) == 2


def test_an_earlier_data_set_is_replaced_but_not_one_holding_other_work(tmp_path):
    out = generate_dataset(tmp_path / "ds", n_photos=2, sketches_per_photo=1)
    generate_dataset(out, n_photos=3, sketches_per_photo=1)  # an earlier data set: replaced
    assert len(load_dataset(out).photos) == 3
    other_work(out / "mine")
    with pytest.raises(DataError, match=r"holds mine besides the data set.*--force"):
        generate_dataset(out, n_photos=2, sketches_per_photo=1)
    assert (out / "mine" / "notes.txt").is_file() and len(load_dataset(out).photos) == 3


@pytest.mark.parametrize("which", ["photos", "inputs"])
def test_out_never_replaces_an_input_even_with_force(tmp_path, which):
    coords, photos = qmul_inputs(tmp_path)
    out = photos if which == "photos" else coords.parent
    before = snapshot(out)
    for force in (False, True):
        with pytest.raises(DataError, match="an input of this command"):
            import_qmul(coords, photos, out, force=force)
    with pytest.raises(DataError, match="an input of this command"):
        import_qmul(coords, photos, tmp_path, force=True)  # holds both inputs
    assert snapshot(out) == before


def test_out_dot_writes_in_place_without_leftovers(tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(GENERATE + ["--out", "."]) == 0
    assert main(GENERATE + ["--out", ".", "--seed", "1"]) == 0  # and replaced in place
    assert Path.cwd() == here and here.is_dir()
    assert sorted(p.name for p in here.iterdir()) == [STAMP, "manifest.json", "photos.parquet", "sketches.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    assert load_dataset(".").manifest["source"].endswith("seed=1")


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_are_created_with_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = generate_dataset(tmp_path / "ds", n_photos=2, sketches_per_photo=1)
        run_json = atomic_write_json(tmp_path / "run" / "run.json", {"kind": "test"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(run_json.stat().st_mode) == 0o666 & ~mask


def read_only(monkeypatch, locked: Path) -> None:
    """Make `locked` act as a read-only directory does to a non-root user (tests may run as root)."""
    real_mkdir, real_open = os.mkdir, os.open

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):  # tempfile.mkstemp creates files through os.open
        if flags & os.O_CREAT and Path(path).parent == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    real_access = os.access
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))


def test_an_unwritable_output_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    data = generate_dataset(tmp_path / "data", n_photos=2, sketches_per_photo=1)
    phase1 = tmp_path / "phase1"
    atomic_write_json(phase1 / "run.json", {"kind": "triplet"})
    locked = tmp_path / "read-only"
    locked.mkdir()
    read_only(monkeypatch, locked)
    assert main(GENERATE + ["--out", str(locked / "ds")]) == 1
    one_line_error(capsys, str(locked / "ds"), "Permission denied")
    assert main(["pretrain", "--data", str(data), "--run-dir", str(locked / "run")]) == 1
    one_line_error(capsys, str(locked / "run"), "Permission denied")
    # the directory itself read-only (issue 25, item 7): refused before any work, as one line
    assert main(["evaluate", "--data", str(data), "--run", str(phase1), "--out", str(locked)]) == 1
    one_line_error(capsys, str(locked), "Permission denied")
    assert main(["data", "show", "--data", str(data), "--out", str(locked / "show.png")]) == 1
    one_line_error(capsys, str(locked / "show.png"), "Permission denied")
    assert list(locked.iterdir()) == []


def test_out_through_a_link_replaces_what_it_points_to_and_keeps_the_link(tmp_path):
    real = generate_dataset(tmp_path / "real", n_photos=2, sketches_per_photo=1)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(GENERATE + ["--out", str(link), "--photos", "3"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert len(load_dataset(real).photos) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_directory_that_cannot_be_renamed_is_left_as_it_was_with_nothing_beside_it(tmp_path, monkeypatch, capsys):
    out = generate_dataset(tmp_path / "mnt", n_photos=2, sketches_per_photo=1)
    before = snapshot(out)
    real_replace = os.replace

    failing = {"moving": "out"}

    def replace(src, dst):  # what rename(2) says about a mount point
        moving_out = Path(src) == out
        moving_in = Path(dst) == out and Path(src).name.startswith(".mnt.tmp-")
        if moving_out if failing["moving"] == "out" else moving_in:
            raise OSError(16, "Device or resource busy")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os.path, "ismount", lambda path: False)  # a bind mount the check does not see
    assert main(GENERATE + ["--out", str(out), "--photos", "3"]) == 1
    one_line_error(capsys, str(out), "Device or resource busy")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]
    failing["moving"] = "in"  # moved away, then the new one cannot take its place: the old one comes back
    assert main(GENERATE + ["--out", str(out), "--photos", "3"]) == 1
    one_line_error(capsys, str(out), "Device or resource busy")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]
    # one it sees is filled in place
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out)
    assert main(GENERATE + ["--out", str(out), "--photos", "3"]) == 0
    assert len(load_dataset(out).photos) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]
    assert sorted(p.name for p in out.iterdir()) == [STAMP, "manifest.json", "photos.parquet", "sketches.parquet"]


# ---------------------------------------------------------------- run directories


def run_dir_commands(tmp_path: Path) -> dict[str, list[str]]:
    """Every command that writes a directory, with dummy inputs (the check comes before reading them)."""
    data, phase1 = tmp_path / "data", tmp_path / "phase1"
    for d in (data, phase1):
        d.mkdir()
    atomic_write_json(phase1 / "run.json", {"kind": "triplet"})
    common = ["--data", str(data), "--embedding", str(phase1)]
    return {
        "pretrain": ["pretrain", "--data", str(data), "--run-dir"],
        "train": ["train", *common, "--run-dir"],
        "evaluate": ["evaluate", "--data", str(data), "--run", str(phase1), "--out"],
        "report": ["report", *common, "--run-dir"],
        "sweep": ["sweep", *common, "--run-dir"],
        "demo": ["demo", "--shared-data", str(tmp_path / "none"), "--run-dir"],
        "play": ["play", *common, "--out"],
    }


@pytest.mark.parametrize("command", ["pretrain", "train", "evaluate", "report", "sweep", "demo", "play"])
def test_every_command_refuses_a_directory_of_other_work(tmp_path, capsys, command):
    argv = run_dir_commands(tmp_path)[command]
    out = tmp_path / "work"
    before = other_work(out)
    assert main(argv + [str(out)]) == 1
    one_line_error(capsys, str(out), "holds other work", "--force")
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["pretrain", "train", "evaluate", "report", "sweep", "play"])
def test_a_command_never_writes_into_its_input(tmp_path, capsys, command):
    argv = run_dir_commands(tmp_path)[command]
    target = tmp_path / ("phase1" if "--embedding" in argv else "data")
    before = snapshot(target)
    assert main(argv + [str(target), "--force"]) == 1
    one_line_error(capsys, "an input of this command")
    assert snapshot(target) == before


@pytest.mark.parametrize("command", ["pretrain", "train", "evaluate", "report", "sweep", "play"])
def test_a_command_never_writes_beside_its_input(tmp_path, capsys, command):
    """`darp evaluate --data par/data --out par --force` wrote next to its input (issue 25, item 9)."""
    argv = run_dir_commands(tmp_path)[command]
    before = snapshot(tmp_path)
    assert main(argv + [str(tmp_path), "--force"]) == 1
    one_line_error(capsys, f"{tmp_path}: holds", "an input of this command")
    assert snapshot(tmp_path) == before


KINDS = ["tune_runs.pretrain:RUN_KIND", "policies.running.runs:RL_RUN_KIND", "policies.running.evaluate:EVAL_KIND",
         "policies.running.report:REPORT_KIND", "policies.running.sweep:SWEEP_KIND", "tune_runs.demo:DEMO_KIND",
         "policies.running.hand_play:FRAMES_KIND"]


def output_kind(name: str) -> OutputKind:
    import importlib

    module, attr = name.split(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("kind", KINDS)
def test_resuming_into_a_directory_of_the_same_kind_is_allowed(tmp_path, kind):
    out = tmp_path / "out"
    assert prepare_output_dir(out, output_kind(kind)) == out  # killed at once: only the stamp is there
    (out / "partial" / "result.json").parent.mkdir()
    (out / "partial" / "result.json").write_text("x")
    assert prepare_output_dir(out, output_kind(kind)) == out
    assert (out / "partial" / "result.json").read_text() == "x"


@pytest.mark.parametrize("kind", KINDS)
def test_a_directory_of_another_kind_is_refused(tmp_path, kind):
    out = tmp_path / "out"
    prepare_output_dir(out, OutputKind("data set", ("manifest.json",)))
    (out / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="holds a data set written by darp, not a"):
        prepare_output_dir(out, output_kind(kind))


# Names a command writes, in someone else's folder: `tune-notes/` was deleted by train's start-over,
# frame_000..020.png by play, curve.png overwritten by evaluate (issue 25, items 2-4).
@pytest.mark.parametrize("command, names", [
    ("train", ["tune-notes/todo.txt"]),
    ("play", [f"frame_{i:03d}.png" for i in range(21)]),
    ("evaluate", ["curve.png", "glimpses.png", "metrics.json"]),
    ("pretrain", ["checkpoint.pt", "run.json"]),
    ("sweep", ["best_config.json", "trials.csv"]),
])
def test_file_names_alone_do_not_make_a_directory_a_commands_own(tmp_path, capsys, command, names):
    argv = run_dir_commands(tmp_path)[command]
    out = tmp_path / "figs"
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    before = snapshot(out)
    assert main(argv + [str(out)]) == 1
    one_line_error(capsys, str(out), "holds other work", "written by darp", "--force")
    assert snapshot(out) == before


def test_check_output_dir_rules(tmp_path):
    kind = OutputKind("thing", ("thing.json",), frozenset({"thing.json", "part"}))
    assert check_output_dir(tmp_path / "new", kind) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", kind, replace=True)
    ours = tmp_path / "ours"
    replace_dir(ours, lambda tmp: (tmp / "thing.json").write_text("{}"), kind)
    check_output_dir(ours, kind, replace=True)
    (ours / "extra").write_text("")
    check_output_dir(ours, kind)  # written into: the extra file stays
    with pytest.raises(DataError, match="holds extra besides the thing"):
        check_output_dir(ours, kind, replace=True)
    check_output_dir(ours, kind, replace=True, force=True)
    inside = ours / "input.txt"
    with pytest.raises(DataError, match=f"holds {inside}, an input"):
        check_output_dir(ours, kind, inputs=[inside], replace=True, force=True)
    with pytest.raises(DataError, match=f"holds {inside}, an input"):  # written into, not replaced: the same
        check_output_dir(ours, kind, inputs=[inside], force=True)
    with pytest.raises(DataError, match=f"is {ours}, an input"):
        check_output_dir(ours, kind, inputs=[None, ours], force=True)
    link = tmp_path / "link"
    link.symlink_to(ours)
    with pytest.raises(DataError, match="an input"):
        check_output_dir(link, kind, inputs=[ours], force=True)


def test_replace_dir_keeps_the_old_directory_when_writing_fails(tmp_path):
    kind = OutputKind("thing", ("thing.json",))
    out = tmp_path / "out"
    replace_dir(out, lambda tmp: (tmp / "thing.json").write_text("1"), kind)

    def fail(tmp):
        (tmp / "thing.json").write_text("2")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        replace_dir(out, fail, kind)
    assert (out / "thing.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((replace_dir(out, lambda tmp: (tmp / "thing.json").write_text("3"), kind) / "thing.json").read_text()) == 3


@pytest.mark.parametrize("content", ["text", "list"])
def test_backbone_weights_that_are_not_a_state_dict_are_a_one_line_error(tmp_path, capsys, content):
    import torch

    data = generate_dataset(tmp_path / "data", n_photos=6, sketches_per_photo=2)
    weights = tmp_path / "weights.pt"
    if content == "text":
        weights.write_text("these are not weights")
    else:
        torch.save([torch.zeros(3)], weights)
    argv = ["pretrain", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
            "--backbone", "resnet18", "--backbone-weights", str(weights)]
    assert main(argv) == 1
    one_line_error(capsys, str(weights), "cannot read a state dict" if content == "text" else "expected a state dict")
