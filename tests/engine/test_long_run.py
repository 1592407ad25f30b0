"""What a long run keeps: checkpoints every N epochs with a retention count, and the online kNN monitor."""
import json

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import ConfigError
from engine.monitor import KnnMonitor
from engine.trainer import train
from tests.conftest import tiny_config

STEPS_PER_EPOCH = 120 // 16


def rows(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


SMALL = ("augment.num_local=0", "model.head_hidden=32", "augment.global_size=16", "eval.resize=16",
         "eval.crop=16")


def test_kept_checkpoints_monitor_and_unchanged_losses(tiny_data, tmp_path, capsys):
    extra = ("train.keep_every_epochs=1", "train.monitor_every_epochs=1", "train.monitor_bank=60",
             "train.monitor_queries=30")
    out = train(tiny_config(tiny_data, tmp_path / "a", *SMALL, *extra))
    train(tiny_config(tiny_data, tmp_path / "b", *SMALL))
    a, b = tmp_path / "a", tmp_path / "b"

    # kept copies after epochs 1 and 2, each the state after its epoch; the last one is the rolling checkpoint
    assert [(e, p.name) for e, p in ckpt.kept_checkpoints(a)] == [(1, "checkpoint_e0001.pt"), (2, "checkpoint_e0002.pt")]
    e1, e2, rolling = (ckpt.load(a / n) for n in ("checkpoint_e0001.pt", "checkpoint_e0002.pt", "checkpoint.pt"))
    assert (e1["epoch"], e1["global_step"]) == (1, STEPS_PER_EPOCH)
    assert e2["global_step"] == rolling["global_step"] == out["global_step"] == 2 * STEPS_PER_EPOCH
    assert not torch.equal(e1["model"]["backbone.conv1.weight"], e2["model"]["backbone.conv1.weight"])
    assert all(torch.equal(v, rolling["model"][k]) for k, v in e2["model"].items())
    assert not list(a.glob(".*.tmp")) and not list(b.glob("checkpoint_e*"))   # off by default

    # the monitor: a row at initialisation (with the raw-pixel reference) and per epoch, real kNN scores on 30
    # held-out val images, and training untouched by it
    log_a = rows(a)
    mon = [r for r in log_a if "monitor_knn_top1" in r]
    assert [(r["epoch"], r["step"]) for r in mon] == [(0, 0), (1, STEPS_PER_EPOCH), (2, 2 * STEPS_PER_EPOCH)]
    keys = {"monitor_knn_top1", "monitor_seconds", "step", "epoch", "time"}
    assert set(mon[0]) == keys | {"monitor_pixels_knn_top1"} and all(set(r) == keys for r in mon[1:])
    for v in [r["monitor_knn_top1"] for r in mon] + [mon[0]["monitor_pixels_knn_top1"]]:
        assert 20.0 < v <= 100.0 and abs(v * 0.3 - round(v * 0.3)) < 1e-6  # above 2x chance, whole images of 30
    out_text = capsys.readouterr().out
    assert out_text.count("(30 queries, bank 60)") == 3 and out_text.count("raw pixels") == 1
    loss_a = {r["step"]: r["total"] for r in log_a if "total" in r}
    assert loss_a == {r["step"]: r["total"] for r in rows(b)}   # epoch 2 after the monitor: same losses, bit for bit

    # resume picks the newest: the rolling checkpoint, else the highest kept epoch
    assert ckpt.resolve_resume("auto", a) == a / "checkpoint.pt"
    (a / "checkpoint.pt").unlink()
    assert ckpt.resolve_resume("auto", a) == a / "checkpoint_e0002.pt"
    assert ckpt.resolve_resume("auto", tmp_path / "empty") is None


def test_keep_copy_is_atomic_and_prune_keeps_the_newest(tmp_path):
    src = ckpt.save_atomic({"w": torch.ones(2)}, tmp_path / "checkpoint.pt")
    for e in (5, 10, 100, 15):
        ckpt.keep_copy(src, tmp_path / ckpt.kept_name(e))
    ckpt.save_atomic({"w": torch.zeros(2)}, src)                     # the rolling file moves on ...
    assert torch.equal(ckpt.load(tmp_path / "checkpoint_e0100.pt")["w"], torch.ones(2))   # ... the kept copy not
    deleted = ckpt.prune_kept(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["checkpoint_e0005.pt", "checkpoint_e0010.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint_e0015.pt", "checkpoint_e0100.pt"]
    assert ckpt.prune_kept(tmp_path, keep_last=0) == []              # 0: keep all


def test_monitor_without_val_split_queries_held_out_training_images(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "r", "data.val_split=none", "train.monitor_every_epochs=1",
                      "train.monitor_bank=100", "train.monitor_queries=50")
    mon = KnnMonitor(cfg, torch.device("cpu"))
    assert mon.query_split == "train" and len(mon.bank) == 100
    assert len(mon.queries) == 20 and not set(mon.bank) & set(mon.queries)   # the 20 images left, disjoint
    val = KnnMonitor(tiny_config(tiny_data, tmp_path / "r", "train.monitor_queries=1000"), torch.device("cpu"))
    assert val.query_split == "val" and len(val.queries) == 40                # the whole (40-image) val split


def test_monitor_pixel_reference_does_not_depend_on_the_network(tiny_data, tmp_path):
    from methods.registry import build_model
    mon = KnnMonitor(tiny_config(tiny_data, tmp_path / "r", *SMALL, "train.monitor_bank=100",
                                 "train.monitor_queries=40"), torch.device("cpu"))
    recs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        recs.append(mon(build_model(mon.cfg), pixels=True))
    assert recs[0]["monitor_pixels_knn_top1"] == recs[1]["monitor_pixels_knn_top1"]
    assert "monitor_pixels_knn_top1" not in mon(build_model(mon.cfg))


def test_bad_keep_and_monitor_settings_are_one_line_errors(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="train.keep_last': must be >= 0"):
        tiny_config(tiny_data, tmp_path, "train.keep_last=-1")
    with pytest.raises(ConfigError, match="train.monitor_k': must be > 0"):
        tiny_config(tiny_data, tmp_path, "train.monitor_k=0")
    cfg = tiny_config(tmp_path / "nowhere", tmp_path, "train.monitor_every_epochs=1")
    with pytest.raises(ValueError, match="train.monitor_every_epochs: cannot list") as exc:
        KnnMonitor(cfg, torch.device("cpu"))
    assert "\n" not in str(exc.value)
