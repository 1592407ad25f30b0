import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import demo_data as dd

N_TRAIN, N_VAL = 12, 5
needs_fmnist = pytest.mark.skipif(not dd.fmnist_available(), reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not dd.fmnist_available():
        pytest.skip("dataset-fashion-mnist not installed")
    out = tmp_path_factory.mktemp("demo") / "fm"
    man = dd.build_demo(out, limit_per_class=N_TRAIN, val_per_class=N_VAL, size=64)
    return out, man


def _imgs(folder):
    return sorted(Path(folder).glob("*.jpg"))


def test_layout_and_manifest(built):
    out, man = built
    assert man["source"] == "fashion-mnist"
    assert (out / "classes.txt").read_text().split() == dd.FMNIST_CLASSES
    assert json.loads((out / "demo_data.json").read_text())["counts"] == man["counts"]
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        classes = sorted(p.name for p in (out / split).iterdir())
        assert classes == dd.FMNIST_CLASSES == sorted(dd.FMNIST_CLASSES)
        for c in classes:
            assert len(_imgs(out / split / c)) == n
            assert man["counts"][split][c] == n
    assert man["totals"] == {"train": 10 * N_TRAIN, "val": 10 * N_VAL}
    assert not list(out.parent.glob("fm.tmp-*")) and not list(out.parent.glob("fm.old-*"))


def test_images_are_64px_rgb_jpeg(built):
    out, _ = built
    for p in _imgs(out / "train" / "3_dress")[:3] + _imgs(out / "val" / "8_bag")[:3]:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 64)
            a = np.asarray(im).astype(int)
        assert np.abs(a[..., 0] - a[..., 1]).max() <= 8  # grayscale content


def _mean(folder):
    return np.mean([np.asarray(Image.open(p).convert("L"), np.float32) for p in _imgs(folder)], 0)


def test_classes_differ_in_content(built):
    out, _ = built
    trouser, bag = _mean(out / "train" / "1_trouser"), _mean(out / "train" / "8_bag")
    assert np.abs(trouser - bag).mean() > 20
    # trousers are tall and thin: the outer columns are nearly empty compared to bags
    assert trouser[:, :10].mean() < bag[:, :10].mean()


def test_labels_and_pixels_match_idx(built):
    out, _ = built
    for split, file_split, n in (("train", "train", N_TRAIN), ("val", "t10k", N_VAL)):
        x, y = dd.load_fmnist(file_split)
        for c, cls in enumerate(dd.FMNIST_CLASSES):
            files = _imgs(out / split / cls)
            idx = [int(p.stem) for p in files]
            assert idx == list(np.flatnonzero(y == c)[:n])  # first n per class, stable
            saved = np.asarray(Image.open(files[0]).convert("L"), np.float32)
            ref = np.asarray(Image.fromarray(x[idx[0]]).resize((64, 64), Image.BICUBIC), np.float32)
            other = np.asarray(Image.fromarray(x[idx[0] + 1]).resize((64, 64), Image.BICUBIC), np.float32)
            assert np.abs(saved - ref).mean() < 3
            if y[idx[0] + 1] != c:
                assert np.abs(saved - other).mean() > np.abs(saved - ref).mean()


def test_rebuild_is_idempotent_and_args_change_rebuilds(tmp_path):
    if not dd.fmnist_available():
        pytest.skip("dataset-fashion-mnist not installed")
    out = tmp_path / "d"
    dd.build_demo(out, limit_per_class=3, val_per_class=2, size=32)
    img = _imgs(out / "train" / "1_trouser")[0]
    stamps = [os.stat(p).st_mtime_ns for p in (img, out / "demo_data.json")]
    ino = os.stat(out).st_ino
    man = dd.build_demo(out, limit_per_class=3, val_per_class=2, size=32)
    assert man.get("already_built") is True
    assert [os.stat(p).st_mtime_ns for p in (img, out / "demo_data.json")] == stamps
    assert os.stat(out).st_ino == ino
    man = dd.build_demo(out, limit_per_class=3, val_per_class=4, size=32)
    assert "already_built" not in man
    assert len(_imgs(out / "val" / "0_tshirt_top")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_photo_source(tmp_path):
    man = dd.build_demo(tmp_path / "p", limit_per_class=4, val_per_class=2, size=48, source="photos")
    assert man["source"] == "photos"
    classes = (tmp_path / "p" / "classes.txt").read_text().split()
    assert len(classes) >= 2 and classes == man["classes"]
    means = []
    for c in classes:
        assert len(_imgs(tmp_path / "p" / "train" / c)) == 4
        assert len(_imgs(tmp_path / "p" / "val" / c)) == 2
        with Image.open(_imgs(tmp_path / "p" / "train" / c)[0]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 48)
        means.append(_mean(tmp_path / "p" / "train" / c).mean())
    assert len(set(np.round(means, 1))) > 1
    # deterministic for a fixed seed
    again = dd.build_demo(tmp_path / "q", limit_per_class=4, val_per_class=2, size=48, source="photos")
    f = f"train/{classes[0]}/00001.jpg"
    assert again["counts"] == man["counts"]
    assert (tmp_path / "p" / f).read_bytes() == (tmp_path / "q" / f).read_bytes()


def test_auto_falls_back_to_photos(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTWIST_FMNIST_DIR", str(tmp_path / "nothing"))
    man = dd.build_demo(tmp_path / "a", limit_per_class=2, val_per_class=1, size=32)
    assert man["source"] == "photos"
    assert (tmp_path / "a" / "train").is_dir() and (tmp_path / "a" / "val").is_dir()


def _write_fake_fmnist(d, images_bytes):
    d.mkdir()
    for split in ("train", "t10k"):
        (d / f"{split}-images-idx3-ubyte.gz").write_bytes(images_bytes)
        hdr = (0x801).to_bytes(4, "big") + (20).to_bytes(4, "big")
        (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(hdr + bytes(range(10)) * 2))


@pytest.mark.parametrize("kind", ["not_gzip", "bad_magic", "truncated"])
def test_corrupt_idx_gives_clear_error(tmp_path, kind, capsys):
    good_hdr = (0x803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (20, 28, 28))
    payload = {"not_gzip": b"this is not gzip",
               "bad_magic": gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 100),
               "truncated": gzip.compress(good_hdr + b"\x00" * 100)}[kind]
    d = tmp_path / "fm"
    _write_fake_fmnist(d, payload)
    bad = "train-images-idx3-ubyte.gz"
    with pytest.raises(ValueError, match=bad):
        dd.build_demo(tmp_path / "out", limit_per_class=1, val_per_class=1,
                      source="fashion-mnist", fmnist_dir=d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm"]  # nothing half-built
    # a user-side problem: the entry points' shared exit status (engine/cli.py)
    assert dd.main([str(tmp_path / "out"), "--source", "fashion-mnist", "--fmnist-dir", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad in err


def test_missing_idx_with_explicit_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        dd.build_demo(tmp_path / "o", source="fashion-mnist", fmnist_dir=tmp_path)


def test_read_idx_valid_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    hdr = (0x803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in arr.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(hdr + arr.tobytes()))
    np.testing.assert_array_equal(dd.read_idx(tmp_path / "x.gz", 3), arr)
    with pytest.raises(ValueError, match="x.gz"):
        dd.read_idx(tmp_path / "x.gz", 1)


@needs_fmnist
def test_cli(tmp_path, capsys):
    assert dd.main([str(tmp_path / "c"), "--limit-per-class", "2", "--val-per-class", "1", "--size", "40"]) == 0
    assert len(list((tmp_path / "c").glob("train/*/*.jpg"))) == 20
    assert dd.main([str(tmp_path / "c"), "--limit-per-class", "2", "--val-per-class", "1", "--size", "40"]) == 0
    assert "already built" in capsys.readouterr().out
