import torch

from pipelines import build_pipeline
from pipelines.sources import decode_rgb, list_image_folder
from pipelines.order import EpochSampler
from tests.conftest import tiny_config


def test_train_batches_follow_the_spec(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    pipe = build_pipeline(cfg, "train")
    n_files = len(list_image_folder(tiny_data / "train")[0])
    assert len(pipe) == n_files // 16
    pipe.set_epoch(0)
    batches = list(pipe)
    assert len(batches) == len(pipe)
    b = batches[0]
    assert [tuple(v.shape) for v in b.views] == [(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)] * 2
    for v in b.views:
        assert v.dtype == torch.float32 and v.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(v).all()
        # normalized with the recipe's mean/std: pixel range [0,1] maps to [-mean/std, (1-mean)/std]
        lo, hi = -0.286 / 0.353, (1 - 0.286) / 0.353
        assert v.min() >= lo - 1e-4 and v.max() <= hi + 1e-4
    assert not torch.allclose(b.views[0], b.views[1])
    assert b.labels.dtype == torch.long and b.indices.dtype == torch.long
    files, labels, _ = list_image_folder(tiny_data / "train")
    assert b.labels.tolist() == [labels[i] for i in b.indices.tolist()]
    seen = torch.cat([x.indices for x in batches])
    assert len(set(seen.tolist())) == len(seen)  # no sample twice in an epoch


def test_epochs_reshuffle_and_are_reproducible(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    pipe = build_pipeline(cfg, "train")
    pipe.set_epoch(0)
    e0 = [b.indices for b in pipe]
    pipe.set_epoch(1)
    e1 = [b.indices for b in pipe]
    assert not torch.equal(torch.cat(e0), torch.cat(e1))
    pipe.set_epoch(0)
    again = list(pipe)
    assert torch.equal(torch.cat(e0), torch.cat([b.indices for b in again]))
    first = next(iter(build_pipeline(cfg, "train")))  # a fresh pipeline: same views for the same seed/epoch
    assert torch.equal(first.views[2], again[0].views[2])


def test_mid_epoch_start_continues_the_same_order(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    pipe = build_pipeline(cfg, "train")
    pipe.set_epoch(3)
    full = list(pipe)
    pipe.set_epoch(3, start_step=2)
    assert len(pipe) == len(full) - 2
    rest = list(pipe)
    for a, b in zip(full[2:], rest):
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.views[0], b.views[0])


def test_ranks_get_disjoint_equal_shards():
    shards = []
    for rank in range(3):
        s = EpochSampler(10, rank=rank, world=3, seed=1)
        s.set_epoch(2)
        shards.append(list(s))
    assert all(len(s) == 4 for s in shards)
    flat = sum(shards, [])
    assert set(flat) == set(range(10))  # every sample somewhere; 2 repeats pad to equal length


def test_eval_pipeline_is_deterministic(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    pipe = build_pipeline(cfg, "val", train=False)
    a, b = list(pipe), list(pipe)
    assert sum(len(x) for x in a) == 40
    assert torch.equal(a[0].views[0], b[0].views[0])
    assert a[0].views[0].shape[1:] == (3, 32, 32)
    assert torch.equal(torch.cat([x.indices for x in a]), torch.arange(40))


def test_decode_by_content_and_clear_error(tmp_path):
    from PIL import Image
    import io
    import pytest
    buf = io.BytesIO()
    Image.new("L", (5, 4), 77).save(buf, format="PNG")  # a grey PNG, as if named .JPEG
    img = decode_rgb(buf.getvalue(), "x.JPEG")
    assert img.shape == (3, 4, 5) and img.dtype == torch.uint8 and int(img[0, 0, 0]) == 77
    buf = io.BytesIO()
    Image.new("CMYK", (6, 3), (0, 255, 0, 0)).save(buf, format="JPEG")
    img = decode_rgb(buf.getvalue(), "cmyk.jpg")
    assert img.shape == (3, 3, 6) and int(img[0].float().mean()) > 200 and int(img[1].float().mean()) < 60
    with pytest.raises(ValueError, match="broken.jpg"):
        decode_rgb(b"not an image", "broken.jpg")


def test_subset_restricts_the_split(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "data.batch_size=4")
    _, labels, _ = list_image_folder(tiny_data / "train")
    subset = [0, 5, 17, 40, 41, 99]
    batches = list(build_pipeline(cfg, "train", train=False, subset=subset))
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(len(subset)))
    assert torch.cat([b.labels for b in batches]).tolist() == [labels[i] for i in subset]
    assert len(build_pipeline(cfg, "train", train=True, subset=subset)) == len(subset) // 4
