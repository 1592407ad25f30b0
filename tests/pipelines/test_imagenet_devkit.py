"""ImageNet's flat val/ labelled by the ILSVRC2012 devkit (ground-truth IDs + meta.mat), on a tiny fake ImageNet."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.sources import DEVKIT_DATA, LayoutError, list_split

sio = pytest.importorskip("scipy.io", reason="scipy is not installed (it writes and reads the devkit's meta.mat)")

TRAIN = ("n01440764", "n01443537", "n01484850")      # train class folders: labels 0, 1, 2
# (ILSVRC2012_ID, WNID, children): leaves 1-4 in an order other than the WNIDs', then two ancestors (IDs > 1000)
SYNSETS = [(1, "n01484850", []), (2, "n01440764", []), (3, "n01443537", []), (4, "n01491361", []),
           (1001, "n01440000", [2, 3]), (1002, "n00000001", [1001, 1, 4])]
FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
          "num_train_images")


def write_meta(path, rows=SYNSETS):
    """meta.mat as the devkit writes it: a struct array 'synsets' of shape (N, 1) (1860 rows in the real file)."""
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in FIELDS])
    for k, (sid, wnid, children) in enumerate(rows):
        synsets[k, 0] = (np.array([[sid]], np.uint16), np.array([wnid]), np.array([f"words of {wnid}"]),
                         np.array(["a gloss"]), np.array([[len(children)]], np.uint8),
                         np.array(children, np.uint16).reshape(1, -1), np.array([[len(children) > 0]], np.uint8),
                         np.array([[0 if children else 1300]], np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(path, {"synsets": synsets})


def fake_imagenet(root, truth="1\n3\n2\n1\n", place=DEVKIT_DATA):
    """ROOT/train/<wnid>/*.JPEG, a flat ROOT/val/ of 4 images, the devkit's two files under ROOT/`place`."""
    for k, wnid in enumerate(TRAIN):
        (root / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 6), (40 * k, 0, 0)).save(root / "train" / wnid / f"{wnid}_1.JPEG")
    (root / "val").mkdir()
    for n in range(1, 5):
        Image.new("RGB", (6, 8), (0, 50 * n, 0)).save(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG")
    write_meta(root / place / "meta.mat")
    (root / place / "ILSVRC2012_validation_ground_truth.txt").write_text(truth)
    return root


@pytest.mark.parametrize("place", [DEVKIT_DATA, ".", "val", f"../{DEVKIT_DATA}"])
def test_devkit_labels_follow_the_train_class_folders(tmp_path, place):
    root = fake_imagenet(tmp_path / "imagenet", place=place)
    files, labels, classes = list_split(root, "val")
    assert classes == list(TRAIN)
    assert [Path(f).name for f in files] == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 5)]
    assert labels == [2, 1, 0, 2]                     # IDs 1, 3, 2, 1 -> n01484850, n01443537, n01440764, ...


def test_loc_val_solution_is_preferred(tmp_path):
    root = fake_imagenet(tmp_path)
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{n:08d},n01440764 0 0 1 1\n" for n in range(1, 5)))
    assert list_split(root, "val")[1] == [0, 0, 0, 0]


@pytest.mark.parametrize("truth,match", [
    ("1\nx\n2\n1\n", r"ground_truth.txt:2: expected one ILSVRC2012_ID \(1-1000\) per line, got 'x'"),
    ("1\n3\n2\n7\n", r"ground_truth.txt:4: ILSVRC2012_ID 7 is not in .*meta.mat"),
    ("1\n1001\n2\n1\n", r"ground_truth.txt:2: ILSVRC2012_ID 1001 is n01440000 \(.*meta.mat\), not a train class"),
    ("1\n4\n2\n1\n", r"ground_truth.txt:2: ILSVRC2012_ID 4 is n01491361 \(.*meta.mat\), not a train class"),
    ("1\n3\n2\n", r"ILSVRC2012_val_00000004.JPEG: no label in .*ILSVRC2012_validation_ground_truth.txt"),
])
def test_bad_ground_truth_gives_one_line_naming_the_file(tmp_path, truth, match):
    root = fake_imagenet(tmp_path, truth)
    with pytest.raises(LayoutError, match=match) as exc:
        list_split(root, "val")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("write,match", [
    (lambda p: p.write_bytes(b"not a MAT file"), "meta.mat: expected the ILSVRC2012 devkit's meta.mat"),
    (lambda p: sio.savemat(p, {"classes": np.arange(3)}), "meta.mat: expected .* 'synsets' with fields"),
    (lambda p: p.unlink(), "ground_truth.txt needs the devkit's meta.mat"),
])
def test_bad_or_missing_meta_gives_one_line_naming_the_file(tmp_path, write, match):
    root = fake_imagenet(tmp_path)
    write(root / DEVKIT_DATA / "meta.mat")
    with pytest.raises(LayoutError, match=match) as exc:
        list_split(root, "val")
    assert "\n" not in str(exc.value)


def test_without_scipy_the_error_names_both_ways_out(tmp_path, monkeypatch):
    root = fake_imagenet(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)             # `from scipy.io import ...` raises ImportError
    with pytest.raises(LayoutError, match="meta.mat: .*needs scipy .*LOC_val_solution.csv") as exc:
        list_split(root, "val")
    assert "\n" not in str(exc.value)
