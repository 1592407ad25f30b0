"""The ffcv backend with FFCV's real Loader, on a tiny .beton that tools/convert.py writes from real-photo JPEGs.

FFCV compiles its pipeline per Loader (seconds each), so the tests share three Loaders: two simulated ranks and
one evaluation pipeline.
"""
import json

import numpy as np
import pytest
import torch
from ffcv.reader import Reader

from engine.trainer import train
from pipelines import build_pipeline
from pipelines.order import EpochSampler
from tests.conftest import CONVERT_MAX_SIZE, assert_close_to_reference, reference_image, tiny_config
from tools import convert

N = 64


def samples(out):
    rows = (out / "train.samples.tsv").read_text().splitlines()[1:]
    return [(int(r.split("\t")[1]), r.split("\t")[2]) for r in rows]


@pytest.fixture(scope="module")
def beton(convert_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ffcv") / "out"
    assert convert.main([str(convert_source), str(out), "--format", "ffcv", "--workers", "2", "--max-size",
                         str(CONVERT_MAX_SIZE), "--quality", "90", "--compress-prob", "0.5"]) == 0
    return out


@pytest.fixture(scope="module")
def ranks(beton, tmp_path_factory):
    """(config, [rank-0 pipeline, rank-1 pipeline]) of a 2-process run, batch 8."""
    threads = torch.get_num_threads()
    cfg = tiny_config(beton, tmp_path_factory.mktemp("run"), "data.backend=ffcv", "data.batch_size=8",
                      "data.workers=2")
    yield cfg, [build_pipeline(cfg, "train", rank=r, world_size=2) for r in range(2)]
    torch.set_num_threads(threads)       # FFCV's Loader sets torch's thread count to its worker count


def test_beton_matches_report_and_verifies(beton):
    r = json.loads((beton / "train.report.json").read_text())
    assert (r["samples"], r["skipped_count"], r["repaired_count"]) == (N, 3, 3)
    reader = Reader(str(beton / "train.beton"))
    assert int(reader.num_samples) == N and reader.field_names == ["image", "label"]
    image = reader.metadata[f"f{reader.field_names.index('image')}"]
    assert set(image["mode"].tolist()) == {0, 1}          # --compress-prob 0.5: both JPEG and raw samples
    assert max(image["width"].max(), image["height"].max()) == CONVERT_MAX_SIZE
    assert convert.main(["--verify", str(beton)]) == 0


def test_pixels_and_labels_match_the_source(beton, ranks, convert_source):
    rows = samples(beton)
    seen = 0
    for pipe in ranks[1]:
        pipe.set_epoch(0)
        for images, sizes, labels, idx in pipe.images():
            H, W = images.shape[-2:]
            for j, i in enumerate(idx.tolist()):
                h, w = sizes[j].tolist()
                label, file = rows[i]
                assert int(labels[j]) == label
                assert_close_to_reference(images[j, :, :h, :w], reference_image(convert_source / file), file)
                if w < W:     # the decoder copies the last column once into the padding
                    assert torch.equal(images[j, :, :h, w], images[j, :, :h, w - 1])
                if h < H:
                    assert torch.equal(images[j, :, h, :w], images[j, :, h - 1, :w])
                seen += 1
    assert seen == N


def test_every_sample_once_per_epoch_across_ranks(ranks):
    cfg, pipes = ranks
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for rank, pipe in enumerate(pipes):
            pipe.set_epoch(epoch)
            idx = [i for _, _, _, ix in pipe.images() for i in ix.tolist()]
            assert len(pipe) == 4 and len(idx) == N // 2
            sampler = EpochSampler(N, rank, 2, shuffle=True, seed=cfg.train.seed)   # same order as data.backend=torch
            sampler.set_epoch(epoch)
            assert idx == list(sampler)
            per_rank.append(idx)
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N))
        orders.append(per_rank[0])
    assert orders[0] != orders[1]                          # reshuffled every epoch


def test_batches_follow_the_spec_and_resume_mid_epoch(ranks):
    pipe = ranks[1][0]
    pipe.set_epoch(2)
    full = list(pipe)
    b = full[0]
    assert [tuple(v.shape) for v in b.views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    for v in b.views:
        assert v.dtype == torch.float32 and v.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(v).all()
    assert not torch.allclose(b.views[0], b.views[1])
    pipe.set_epoch(2, start_step=2)
    assert len(pipe) == 2
    rest = list(pipe)
    for x, y in zip(full[2:], rest):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.views[0], y.views[0])


def test_eval_pipeline_and_a_training_step(beton, ranks, tmp_path):
    cfg = ranks[0]
    val = list(build_pipeline(cfg, "val", train=False))
    assert torch.equal(torch.cat([b.indices for b in val]), torch.arange(20))
    assert val[0].views[0].shape[1:] == (3, 32, 32) and val[0].views[0].dtype == torch.float32
    mean = np.mean([b.views[0].mean().item() for b in val])
    assert -2.5 < mean < 2.5                                # normalized, not raw 0..255
    run = tiny_config(beton, tmp_path / "run", "data.backend=ffcv", "data.batch_size=16", "data.workers=1",
                      "train.max_steps=2")
    out = train(run)
    assert out["global_step"] == 2
