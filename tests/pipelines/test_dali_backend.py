"""The dali backend in CPU mode: batches, order, epochs, ranks, last batch, evaluation, tar shards."""
import json

import pytest
import torch

from pipelines import build_pipeline
from pipelines.shards import ShardWriter
from pipelines.sources import list_image_folder
from tests.conftest import tiny_config

DALI = ("data.backend=dali", "data.dali.threads=1", "data.dali.prefetch=1")


def cfg_for(tiny_data, tmp_path, *extra):
    return tiny_config(tiny_data, tmp_path, *DALI, *extra)


def indices(pipe):
    return torch.cat([b.indices for b in pipe])


def test_train_batches_follow_the_contract(tiny_data, tmp_path):
    pipe = build_pipeline(cfg_for(tiny_data, tmp_path), "train")
    files, labels, _ = list_image_folder(tiny_data / "train")
    assert len(pipe) == len(files) // 16
    pipe.set_epoch(0)
    batches = list(pipe)
    assert len(batches) == len(pipe)
    b = batches[0]
    assert [tuple(v.shape) for v in b.views] == [(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)] * 2
    lo, hi = -0.286 / 0.353, (1 - 0.286) / 0.353
    for v in b.views:
        assert v.dtype == torch.float32 and v.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(v).all() and v.min() >= lo - 1e-4 and v.max() <= hi + 1e-4
    assert not torch.allclose(b.views[0], b.views[1])
    assert b.labels.dtype == torch.long and b.indices.dtype == torch.long
    for x in batches:
        assert x.labels.tolist() == [labels[i] for i in x.indices.tolist()]   # labels agree with ImageFolder
    seen = indices(batches)
    assert len(set(seen.tolist())) == len(seen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_views_come_in_the_training_dtype(tiny_data, tmp_path, dtype):
    pipe = build_pipeline(cfg_for(tiny_data, tmp_path), "train", dtype=dtype)
    b = next(iter(pipe))
    assert all(v.dtype == dtype and v.is_contiguous(memory_format=torch.channels_last) for v in b.views)


def test_order_is_the_torch_backends_and_epochs_are_reproducible(tiny_data, tmp_path):
    cfg = cfg_for(tiny_data, tmp_path)
    pipe, ref = build_pipeline(cfg, "train"), build_pipeline(tiny_config(tiny_data, tmp_path), "train")
    orders = []
    for epoch in (0, 1):
        pipe.set_epoch(epoch)
        ref.set_epoch(epoch)
        orders.append(indices(pipe))
        assert torch.equal(orders[-1], indices(ref))                  # same seeded per-epoch permutation
    assert not torch.equal(orders[0], orders[1])
    pipe.set_epoch(0)
    again = list(pipe)
    assert torch.equal(indices(again), orders[0])
    fresh = build_pipeline(cfg, "train")                               # a new pipeline: same views
    fresh.set_epoch(0)
    first = next(iter(fresh))
    assert all(torch.equal(a, b) for a, b in zip(first.views, again[0].views))
    pipe.set_epoch(1)
    other = next(iter(pipe))
    assert not torch.equal(other.views[0][:4], again[0].views[0][:4])


def test_mid_epoch_start_continues_the_same_order(tiny_data, tmp_path):
    pipe = build_pipeline(cfg_for(tiny_data, tmp_path), "train")
    pipe.set_epoch(3)
    full = [b.indices for b in pipe]
    pipe.set_epoch(3, start_step=2)
    assert len(pipe) == len(full) - 2
    rest = [b.indices for b in pipe]
    assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(full[2:], rest))
    assert len(pipe) == len(full)                                      # the next pass is a whole epoch again
    pipe.set_epoch(3, start_step=len(full))                            # resumed at the epoch's very end
    assert len(pipe) == 0 and list(pipe) == []


def test_no_epoch_is_skipped_and_the_last_batch_is_partial(tiny_data, tmp_path):
    n = len(list_image_folder(tiny_data / "train")[0])                 # 120 = 7 x 16 + 8
    pipe = build_pipeline(cfg_for(tiny_data, tmp_path, "data.drop_last=false"), "train")
    assert len(pipe) == 8
    for epoch in range(3):
        pipe.set_epoch(epoch)
        batches = list(pipe)
        assert [len(b) for b in batches] == [16] * 7 + [8]
        assert all(v.shape[0] == 8 for v in batches[-1].views)
        assert sorted(indices(batches).tolist()) == list(range(n))


def test_ranks_get_disjoint_equal_shards(tiny_data, tmp_path):
    cfg = cfg_for(tiny_data, tmp_path, "data.batch_size=8", "data.drop_last=false")
    shards = []
    for rank in range(3):
        pipe = build_pipeline(cfg, "train", rank=rank, world_size=3)
        pipe.set_epoch(1)
        shards.append(indices(pipe).tolist())
    assert [len(s) for s in shards] == [40, 40, 40]
    assert set(sum(shards, [])) == set(range(120)) and not set(shards[0]) & set(shards[1])


def test_eval_pipeline_is_deterministic_and_close_to_the_torch_one(tiny_data, tmp_path):
    pipe = build_pipeline(cfg_for(tiny_data, tmp_path, "eval.resize=36", "eval.crop=32"), "val",
                          train=False)
    a, b = list(pipe), list(pipe)
    assert len(pipe) == len(a) == 3 and sum(len(x) for x in a) == 40
    assert torch.equal(torch.cat([x.indices for x in a]), torch.arange(40))
    assert torch.equal(a[0].views[0], b[0].views[0]) and a[0].views[0].shape[1:] == (3, 32, 32)
    ref = list(build_pipeline(tiny_config(tiny_data, tmp_path, "eval.resize=36", "eval.crop=32"),
                              "val", train=False))
    x, y = torch.cat([v.views[0] for v in a]), torch.cat([v.views[0] for v in ref])
    assert torch.equal(torch.cat([v.labels for v in a]), torch.cat([v.labels for v in ref]))
    assert (x - y).abs().mean() < 0.05                                 # resampling differs slightly, in std units


def test_fused_decode_gives_the_same_contract(tiny_data, tmp_path):
    pipe = build_pipeline(cfg_for(tiny_data, tmp_path, "data.dali.decode=fused"), "train")
    b = next(iter(pipe))
    assert [tuple(v.shape) for v in b.views] == [(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)] * 2
    assert not torch.allclose(b.views[2], b.views[3])


# ----------------------------------------------------------------------------------------- tar shards
def test_webdataset_shards(tiny_data, tmp_path):
    files, labels, _ = list_image_folder(tiny_data / "train")
    writer = ShardWriter(tmp_path / "shards" / "train", "train", shard_bytes=100_000)   # the converter's writer
    for i, (f, lab) in enumerate(zip(files[:50], labels[:50])):
        writer.add(i, open(f, "rb").read(), lab)
    writer.close()
    assert len(list((tmp_path / "shards" / "train").glob("*.idx"))) >= 2
    cfg = cfg_for(tmp_path / "shards", tmp_path, "data.batch_size=8", "data.drop_last=false",
                  "data.dali.shuffle_buffer=16")
    pipe = build_pipeline(cfg, "train")
    assert len(pipe) == 7                                              # ceil(50 / 8)
    epochs = []
    for epoch in range(2):
        pipe.set_epoch(epoch)
        batches = list(pipe)
        got = torch.cat([b.indices for b in batches])
        assert len(batches) == 7 and sorted(got.tolist()) == list(range(50))
        for b in batches:
            assert b.labels.tolist() == [labels[i] for i in b.indices.tolist()]
            assert [tuple(v.shape[1:]) for v in b.views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
        epochs.append(got)
    assert not torch.equal(epochs[0], epochs[1])
    ranks = []
    for rank in range(2):
        p = build_pipeline(cfg, "train", rank=rank, world_size=2)
        p.set_epoch(0)
        ranks.append(torch.cat([b.indices for b in p]).tolist())
    assert [len(r) for r in ranks] == [25, 25] and set(ranks[0]) | set(ranks[1]) == set(range(50))
    assert not set(ranks[0]) & set(ranks[1])
    val = build_pipeline(cfg, "train", train=False)                    # deterministic, in shard order
    assert torch.cat([b.indices for b in val]).tolist() == list(range(50))


# ------------------------------------------------------------------------------------------ entry points
def test_train_evaluate_and_show_views_run_with_dali(tiny_data, tmp_path):
    import evaluate
    from engine.trainer import train
    from tools.show_views import main as show_views

    run = tmp_path / "run"
    out = train(cfg_for(tiny_data, run, "train.epochs=1", "train.max_steps=3"))
    assert out["global_step"] == 3 and (run / "checkpoint.pt").is_file()
    res = tmp_path / "eval.json"
    assert evaluate.main(["knn,cluster", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(res),
                          "--ks", "5", *DALI]) == 0
    assert json.loads(res.read_text())["config"]["data"]["backend"] == "dali"
    png = tmp_path / "views.png"
    assert show_views(["--data", str(tiny_data), "--out", str(png), "--n", "3", *DALI]) == 0
    assert png.stat().st_size > 0
