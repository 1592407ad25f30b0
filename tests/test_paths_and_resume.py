"""Relative paths typed on the command line are stored absolute, so a run trained in one directory resumes and
evaluates from another; overrides go on either side of --resume; a resume that changes the schedule says what
changes and what the lr does next."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine import checkpoint as ckpt
from engine.config import config_from_dict, resolve_paths, to_dict
from engine.optim import Schedule
from engine.config_schema import Config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.batch_size=16", "data.workers=0", "augment.global_size=32", "augment.local_size=16",
         "augment.num_local=0", "model.head_hidden=32", "model.head_dim=8", "train.log_every=1",
         "train.device=cpu", "train.monitor_every_epochs=0", "optim.warmup_epochs=0.5", "eval.resize=32",
         "eval.crop=32"]


def _py(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_relative_data_path_is_stored_absolute_and_works_from_another_directory(tiny_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "data").symlink_to(tiny_data)
    _py(a, str(ROOT / "train.py"), "--config", "demo", "data.path=data", "train.out_dir=run", "train.epochs=1",
        *SMALL)
    stored = yaml.safe_load((a / "run" / "config.yaml").read_text())
    assert stored["data"]["path"] == str(a / "data") and stored["train"]["out_dir"] == str(a / "run")
    state = ckpt.load(a / "run" / "checkpoint.pt")
    assert state["config"]["data"]["path"] == str(a / "data") and state["world_size"] == 1

    # from another directory: the stored recipe, overrides after --resume, a longer schedule announced
    r = _py(b, str(ROOT / "train.py"), "--config", str(a / "run" / "config.yaml"), "--resume", "auto",
            "train.epochs=2")
    line = [x for x in r.stdout.splitlines() if x.startswith("resume:")]
    assert len(line) == 1, r.stdout[-2000:]
    step = state["global_step"]
    was = state["optimizer"]["param_groups"][0]["lr"]
    new = config_from_dict(state["config"])
    new.train.epochs = 2
    nxt = Schedule(new.optim, step, 2, 16, 0, new.self_label).lr(step)   # `step` steps per epoch: 1 epoch done
    assert line[0].startswith(f"resume: train.epochs 1 -> 2; lr at step {step} was {was:.3g}, next step "
                              f"{nxt:.3g} ("), line[0]
    assert nxt > 2 * was and "a jump" in line[0]   # near the end of a cosine, then early in a longer one
    assert ckpt.load(a / "run" / "checkpoint.pt")["global_step"] == 2 * step

    # evaluation from the other directory finds the data the checkpoint names
    r = _py(b, str(ROOT / "evaluate.py"), "knn", "--baseline", "init", "--checkpoint", str(a / "run" /
                                                                                          "checkpoint.pt"))
    assert re.search(r"dataset .*/a/data", r.stdout.replace("\n", "")), r.stdout[-2000:]


def test_unchanged_resume_says_nothing_about_the_schedule():
    from engine.trainer import schedule_change
    cfg = resolve_paths(Config())
    state = {"config": to_dict(cfg), "global_step": 5,
             "optimizer": {"param_groups": [{"lr": 0.1}]}, "world_size": 1}
    assert schedule_change(state, cfg, 1, None) == ""
    assert "processes 1 -> 2 (global batch 64 -> 128)" in schedule_change(
        state, cfg, 2, Schedule(cfg.optim, 10, cfg.train.epochs, 128))


def test_relative_data_path_rule(tmp_path, monkeypatch):
    """The working directory first; a path that exists only in the project (data/demo) from the project."""
    import engine.config
    project, cwd = tmp_path / "project", tmp_path / "cwd"
    (project / "data" / "demo").mkdir(parents=True)
    cwd.mkdir()
    monkeypatch.setattr(engine.config, "RECIPES", project / "configs")
    monkeypatch.chdir(cwd)

    def resolved(path: str) -> str:
        cfg = Config()
        cfg.data.path = path
        return resolve_paths(cfg).data.path

    assert resolved("data/demo") == str(project / "data" / "demo")
    assert resolved("mine") == str(cwd / "mine")               # missing everywhere: the error will name cwd/mine
    (cwd / "data" / "demo").mkdir(parents=True)
    assert resolved("data/demo") == str(cwd / "data" / "demo")
    assert resolved(str(tmp_path)) == str(tmp_path)
