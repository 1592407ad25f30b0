from collections import Counter

import pytest

from evaluation.subsets import balanced_subset, class_counts, read_subset_file, subset_names, write_subset_file


def _labels(sizes):
    return [c for c, n in enumerate(sizes) for _ in range(n)]


@pytest.mark.parametrize("percent,per_class", [(1, 1), (10, 13), (50, 65)])
def test_balanced_subset_same_count_per_class(percent, per_class):
    labels = _labels([130] * 10)
    sub = balanced_subset(labels, percent, seed=0)
    assert sub == sorted(set(sub))                                  # sorted positions, no repeats
    assert set(Counter(labels[i] for i in sub).values()) == {per_class}


def test_balanced_subset_uneven_classes_capped_at_class_size():
    labels = _labels([100, 100, 3])                                 # 10% of 203 over 3 classes: 7 each
    counts = class_counts(labels, balanced_subset(labels, 10, seed=1))
    assert counts == {0: 7, 1: 7, 2: 3}


def test_balanced_subset_reproducible_and_seeded():
    labels = _labels([50] * 8)
    a, b = balanced_subset(labels, 10, seed=3), balanced_subset(labels, 10, seed=3)
    assert a == b
    assert balanced_subset(labels, 10, seed=4) != a
    assert balanced_subset(labels, 100, seed=0) == list(range(len(labels)))
    with pytest.raises(ValueError, match="percent"):
        balanced_subset(labels, 0)


def test_subset_file_roundtrip_with_unique_and_repeated_file_names(tmp_path):
    imagenet = [f"/d/train/n01/n01_{i}.JPEG" for i in range(4)] + [f"/d/train/n02/n02_{i}.JPEG" for i in range(4)]
    assert subset_names(imagenet)[0] == "n01_0.JPEG"               # SimCLR style: file names only
    demo = [f"/d/train/{c}/{i:05d}.jpg" for c in ("a", "b") for i in range(3)]
    assert subset_names(demo)[4] == "b/00001.jpg"                 # repeated names: class/file
    for files, sub in ((imagenet, [0, 5, 7]), (demo, [1, 3])):
        path = write_subset_file(tmp_path / "s.txt", files, sub)
        assert read_subset_file(path, files) == sub


def test_subset_file_errors_name_the_line(tmp_path):
    files = [f"/d/train/{c}/{i:05d}.jpg" for c in ("a", "b") for i in range(3)]
    (tmp_path / "s.txt").write_text("# comment\n\na/00001.jpg\nzzz.jpg\n")
    with pytest.raises(ValueError, match=r"s.txt:4: 'zzz.jpg' is not an image"):
        read_subset_file(tmp_path / "s.txt", files)
    (tmp_path / "s.txt").write_text("00001.jpg\n")
    with pytest.raises(ValueError, match="matches 2 images; write it as class/00001.jpg"):
        read_subset_file(tmp_path / "s.txt", files)
    with pytest.raises(FileNotFoundError):
        read_subset_file(tmp_path / "missing.txt", files)
