"""Preemption signals, non-finite losses, disk-full saves and unreadable files mid-run (CPU)."""
import errno
import os
import signal

import pytest
import torch

from engine import checkpoint as ckpt
from engine.distributed import DistInfo
from engine.faults import NonFiniteLoss
from engine.trainer import Run
from tests.conftest import tiny_config


def make_run(tiny_data, out, *extra):
    return Run(tiny_config(tiny_data, out, *extra), DistInfo())


def hook_step(run, at: int, action):
    """Call `action(run, views)` just before the model's forward pass of step number `at` (0-based); the real
    TrainStep does everything else. The step number is the one the step's lr schedule is applied for."""
    sf = run.step_fn
    real_apply = sf.schedule.apply
    current = {}

    def apply(optimizer, i):
        current["i"] = i
        return real_apply(optimizer, i)

    def before_forward(module, args):
        if current.get("i") == at:
            action(run, args[0])
    sf.schedule.apply = apply
    sf.model.register_forward_pre_hook(before_forward)


def test_signal_finishes_step_saves_and_exits(tiny_data, tmp_path):
    run = make_run(tiny_data, tmp_path / "r")
    hook_step(run, 2, lambda r, v: os.kill(os.getpid(), signal.SIGUSR1))
    out = run.fit()
    assert out["stopped_by"] == "SIGUSR1"
    state = ckpt.load(tmp_path / "r" / "checkpoint.pt")
    assert state["global_step"] == 3 and state["step_in_epoch"] == 3  # the signalled step was finished
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored
    resumed = Run(run.cfg, DistInfo(), resume="auto")
    assert resumed.fit()["global_step"] == 2 * 7


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    run = make_run(tiny_data, tmp_path / "r", "train.ckpt_every_steps=2", "train.log_every=2")

    def poison(r, views):
        with torch.no_grad():
            r.model.backbone.conv1.weight.fill_(float("nan"))
    hook_step(run, 4, poison)  # steps 0-3 fine (checkpoint at step 4), step index 4 produces NaN
    with pytest.raises(NonFiniteLoss, match="last good checkpoint: .*step 4") as exc:
        run.fit()
    assert "\n" not in str(exc.value)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after the exception too
    state = ckpt.load(tmp_path / "r" / "checkpoint.pt")
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_nonfinite_skips_the_bad_step_only(tiny_data, tmp_path):
    run = make_run(tiny_data, tmp_path / "r", "train.skip_nonfinite=true", "train.epochs=1")
    snapshot, seen = {}, {}

    def bad_input(r, views):
        views[0][0].fill_(float("nan"))
        snapshot.update({k: v.clone() for k, v in r.model.state_dict().items()})

    def compare(r, views):  # before step 4: step 3 changed nothing (no update, BN statistics restored)
        seen["same"] = all(torch.equal(v, snapshot[k]) for k, v in r.model.state_dict().items())
    hook_step(run, 3, bad_input)
    hook_step(run, 4, compare)
    out = run.fit()
    assert run.step_fn.skipped == 1 and seen == {"same": True}
    assert out["global_step"] == 7 and torch.isfinite(torch.tensor(out["total"]))


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = ckpt.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_corrupt_checkpoint_gives_one_clear_line(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(RuntimeError, match="could not be read") as exc:
        ckpt.load(bad)
    assert "\n" not in str(exc.value)


def test_unreadable_file_mid_run_is_reported_and_replaced(tiny_data, tmp_path, capfd):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "train").rglob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated JPEG
    (data / "train" / victim.parent.name / "empty.jpg").write_bytes(b"")
    run = Run(tiny_config(data, tmp_path / "r", "train.epochs=1"), DistInfo())
    out = run.fit()
    assert out["global_step"] == 121 // 16
    err = capfd.readouterr().err
    named = [line for line in err.splitlines() if "skipped unreadable image" in line]
    assert len(named) == 2 and "a readable sample took its place" in named[0]   # each file once
    assert any(str(victim) in line for line in named) and any("empty.jpg" in line for line in named)
