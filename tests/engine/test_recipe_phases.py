"""The full recipe in the loop: schedules of the self-labeling phase and the momentum encoder, the phase switch,
and resuming after it (CPU)."""
import json

import pytest

from engine import checkpoint as ckpt
from engine.config import load_config
from engine.distributed import DistInfo
from engine.optim import Schedule
from methods.twist.phases import Phases
from engine.trainer import Run
from tests.conftest import tiny_config


def test_phases_and_schedules():
    cfg = load_config("configs/rn50_multicrop.yaml")          # 850 epochs, self-labeling after 800
    ph = Phases(cfg, steps_per_epoch=10)
    assert ph.quantile(7999) is None and ph.quantile(8000) == pytest.approx(0.5)
    assert ph.quantile(8500) == pytest.approx(0.6)
    assert ph.momentum(0) == pytest.approx(0.996) and ph.momentum(8000) == pytest.approx(1.0)
    assert ph.momentum(10 ** 6) == pytest.approx(1.0)          # never past the end of its schedule
    s = Schedule(cfg.optim, 10, 850, global_batch=4096, sl_start_epoch=800)
    assert s.lr(0) == 0.0 and s.lr(50) == pytest.approx(0.25 * 16)  # official warmup: lr * step / warmup
    assert s.lr(100) == pytest.approx(0.5 * 16)                # end of warmup: lr x 4096/256
    assert s.lr(7999) == pytest.approx(0.008, rel=0.01)        # TWIST cosine ends at 0.001 x peak at step 8000
    assert s.lr(8000) == 0.0                                   # self-labeling warmup restarts from 0
    assert s.lr(8025) == pytest.approx(0.05 * 16 / 2)
    assert s.lr(8050) == pytest.approx(0.05 * 16)              # ... to lr_sl after 5 epochs


def losses(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


def test_self_labeling_and_momentum_encoder_resume_exactly(tiny_data, tmp_path):
    extra = ["train.epochs=2", "self_label.start_epoch=1", "model.momentum_encoder=true", "model.head_act=gelu",
             "self_label.warmup_epochs=0.5"]
    ref = Run(tiny_config(tiny_data, tmp_path / "a", *extra), DistInfo())
    ref.fit()
    assert ref.pipe_spec.groups[0].scale == (0.14, 1.0) and ref.pipe_spec.groups[-1].scale == (0.05, 0.14)
    log = losses(tmp_path / "a")
    assert all("ce" not in log[s] for s in range(1, 8)) and all("ce" in log[s] for s in range(8, 15))
    assert "teacher" in ckpt.load(tmp_path / "a" / "checkpoint.pt")["step_state"]
    part = Run(tiny_config(tiny_data, tmp_path / "b", *extra, "train.max_steps=10"), DistInfo())
    part.fit()
    resumed = Run(tiny_config(tiny_data, tmp_path / "b", *extra), DistInfo(), resume="auto")
    resumed.fit()
    assert resumed.pipe_spec == ref.pipe_spec              # harder crops also after resuming past the switch
    got = losses(tmp_path / "b")
    for step, rec in log.items():
        assert got[step]["total"] == pytest.approx(rec["total"], rel=1e-5, abs=1e-6), step
        assert got[step]["lr"] == pytest.approx(rec["lr"])


def test_recipes_carry_the_official_values():
    vs = load_config("configs/vit_small.yaml")
    assert (vs.model.arch, vs.model.momentum_encoder, vs.optim.name, vs.loss.lam1) == ("vit_small", True, "adamw", -0.6)
    assert (vs.optim.weight_decay, vs.optim.weight_decay_end, vs.optim.clip_grad) == (0.06, 0.12, 3.0)
    vb = load_config("configs/vit_base.yaml")
    assert (vb.model.drop_path, vb.augment.num_local, vb.data.batch_size) == (0.1, 10, 32)
    w2 = load_config("configs/rn50w2_multicrop.yaml")
    assert (w2.model.arch, w2.model.bunch_size, w2.train.epochs, w2.self_label.start_epoch) == ("resnet50w2", 240, 250, 200)
    mc = load_config("configs/rn50_multicrop.yaml")
    assert (mc.model.head_bn, mc.self_label.start_epoch, mc.self_label.lr) == ("bunch", 800, 0.05)
