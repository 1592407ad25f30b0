"""Every tool reads datasets through pipelines.sources.list_split: one set of accepted layouts."""
import json
import shutil

import pytest

from pipelines.sources import HOLDOUT_EVERY, LayoutError, MissingSplit, list_split, load_source
from tools import convert


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_val_labels_use_the_train_class_index(tmp_path):
    for cls in ("a", "b", "c"):
        _touch(tmp_path / "train" / cls / f"{cls}0.jpg")
    _touch(tmp_path / "val" / "c" / "c1.jpg")           # val lacks a and b: c must still be label 2
    files, labels, classes = list_split(tmp_path, "val")
    assert labels == [2] and classes == ["a", "b", "c"] and files[0].endswith("c1.jpg")


def test_flat_imagenet_val_with_loc_solution(tmp_path):
    for cls in ("n01", "n02"):
        _touch(tmp_path / "train" / cls / "x.JPEG")
    for k in range(3):
        _touch(tmp_path / "val" / f"ILSVRC2012_val_0000000{k}.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000000,n02 1 2 3 4\nILSVRC2012_val_00000001,n01 5 6 7 8 n01 1 1 1 1\n"
        "ILSVRC2012_val_00000002,n02 0 0 1 1\n")
    files, labels = load_source(tmp_path, "val")
    assert labels == [1, 0, 1] and len(files) == 3
    _touch(tmp_path / "val" / "ILSVRC2012_val_00000009.JPEG")
    with pytest.raises(LayoutError, match="ILSVRC2012_val_00000009.JPEG: no label in .*LOC_val_solution.csv"):
        load_source(tmp_path, "val")


def test_single_folder_of_class_folders_holds_out_val(tmp_path):
    for cls, n in (("a", 25), ("b", 7)):
        for k in range(n):
            _touch(tmp_path / cls / f"{k:02d}.jpg")
    tr_files, tr_labels, classes = list_split(tmp_path, "train")
    va_files, va_labels, _ = list_split(tmp_path, "val")
    assert classes == ["a", "b"]
    assert not set(tr_files) & set(va_files) and len(tr_files) + len(va_files) == 32
    # per class, files 0, 10, 20, ... are held out
    assert va_labels == [0, 0, 0, 1] and [f[-6:] for f in va_files] == ["00.jpg", "10.jpg", "20.jpg", "00.jpg"]
    assert HOLDOUT_EVERY == 10


def test_unknown_layout_names_the_path_and_the_layouts(tmp_path):
    with pytest.raises(LayoutError, match="'.*nope' not found; set data.path .*layouts: ROOT/train/<class>") as e:
        load_source(tmp_path / "nope", "train")
    assert "demo_data" not in str(e.value)          # the user's own path: building the demo is not the fix
    with pytest.raises(LayoutError, match="build it with `python tools/demo_data.py .*demo`"):
        load_source(tmp_path / "demo", "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    _touch(tmp_path / "train" / "a" / "x.jpg")
    with pytest.raises(MissingSplit, match="has no 'val' split"):
        load_source(tmp_path, "val")


def test_files_straight_in_the_split_folder_say_so(tmp_path):
    for name in ("x.jpg", "y.jpg"):
        _touch(tmp_path / "train" / name)
    with pytest.raises(LayoutError, match="train' holds 2 files but no class folders; move each class's images "
                                          "into .*train/<class>/"):
        load_source(tmp_path, "train")


def test_convert_accepts_a_single_folder_and_a_flat_val(convert_source, tmp_path):
    single = tmp_path / "single"
    shutil.copytree(convert_source / "val", single)      # 10 class folders x 2 images
    assert convert.main([str(single), str(tmp_path / "o1"), "--format", "shards", "--workers", "1"]) == 0
    r_train = json.loads((tmp_path / "o1" / "train.report.json").read_text())
    r_val = json.loads((tmp_path / "o1" / "val.report.json").read_text())
    assert (r_train["samples"], r_val["samples"]) == (10, 10)

    flat = tmp_path / "flat"
    shutil.copytree(convert_source / "train", flat / "train")
    lines, k = ["ImageId,PredictionString"], 0
    (flat / "val").mkdir()
    for cls_dir in sorted((convert_source / "val").iterdir()):
        for f in sorted(cls_dir.iterdir()):
            shutil.copy(f, flat / "val" / f"img{k}{f.suffix}")
            lines.append(f"img{k},{cls_dir.name} 0 0 1 1")
            k += 1
    (flat / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    assert convert.main([str(flat), str(tmp_path / "o2"), "--format", "shards", "--workers", "1",
                         "--splits", "val"]) == 0
    tsv = (tmp_path / "o2" / "val.samples.tsv").read_text().splitlines()[1:]
    classes = json.loads((tmp_path / "o2" / "classes.json").read_text())
    expect = {f"val/img{k}{f.suffix}": classes[d.name] for k, (d, f) in enumerate(
        (d, f) for d in sorted((convert_source / "val").iterdir()) for f in sorted(d.iterdir()))}
    assert {line.split("\t")[2]: int(line.split("\t")[1]) for line in tsv} == expect
