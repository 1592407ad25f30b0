"""End-to-end: train.py, resume, 2-process DDP (gloo). evaluate.py: tests/test_evaluate.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine import checkpoint as ckpt
from engine.trainer import train
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["total"] for r in rows if "total" in r}   # loss rows (not the online monitor's)


def test_train_writes_checkpoint_config_and_log(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run")
    out = train(cfg)
    run = tmp_path / "run"
    state = ckpt.load(run / "checkpoint.pt")
    assert state["global_step"] == out["global_step"] == 2 * (120 // 16)
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert state["config"]["model"]["head_dim"] == 16
    assert (run / "config.yaml").is_file()
    log = losses(run)
    assert sorted(log) == list(range(1, out["global_step"] + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in log.values())
    assert not list(run.glob("*.tmp"))  # atomic writes leave no temp files


def test_resume_reproduces_uninterrupted_losses(tiny_data, tmp_path):
    ref = tiny_config(tiny_data, tmp_path / "a")
    train(ref)
    part = tiny_config(tiny_data, tmp_path / "b", "train.max_steps=10")  # stops mid-epoch 1 (7 steps/epoch)
    train(part)
    assert ckpt.load(tmp_path / "b" / "checkpoint.pt")["step_in_epoch"] == 3
    train(tiny_config(tiny_data, tmp_path / "b"), resume="auto")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def test_train_cli_rejects_bad_config_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.yaml", "optim.lrr=1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown config key 'optim.lrr'" in r.stderr


def test_two_process_ddp_with_gloo(tiny_data, tmp_path):
    run = tmp_path / "ddp"
    args = [f"data.path={tiny_data}", f"train.out_dir={run}", "data.batch_size=8", "data.workers=0",
            "augment.global_size=32", "augment.local_size=16", "augment.num_local=2", "model.head_hidden=64",
            "model.head_dim=16", "train.epochs=1", "train.log_every=1", "train.device=cpu",
            "model.head_bn=bunch", "model.bunch_size=16",  # one bunch-BN group of both ranks
            "model.momentum_encoder=true"]  # the ViT recipes' pair: the teacher copies the bunch BN's group
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29612",
                        "train.py", "--config", "configs/demo.yaml", *args], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    state = ckpt.load(run / "checkpoint.pt")
    assert state["global_step"] == 120 // 2 // 8  # each rank sees half the data
    log = losses(run)
    assert sorted(log) == list(range(1, state["global_step"] + 1))  # rank 0 alone writes, once per step
