"""Label subsets for semi-supervised evaluation (the 1% / 10% ImageNet protocols).

Either a SimCLR-style subset file (one image file name per line, e.g. `n01440764_10026.JPEG`; a line may also
name `class/file.jpg`) or a deterministic class-balanced draw from a seed. Subsets are lists of positions in
the split's file list, sorted.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch


def balanced_subset(labels: list[int], percent: float, seed: int = 0) -> list[int]:
    """The same number of samples from every class — round(percent% of the split / number of classes), at
    least 1, at most the class size (ImageNet 1%: 13 a class) — each class drawn by a permutation seeded with
    (seed, class)."""
    if not 0 < percent <= 100:
        raise ValueError(f"train percent must be in (0, 100], got {percent}")
    if not labels:
        raise ValueError("cannot draw a subset of an empty split")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    if percent == 100:
        return list(range(len(labels)))
    per_class = max(1, round(percent / 100.0 * len(labels) / len(by_class)))
    chosen: list[int] = []
    for y, members in sorted(by_class.items()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + y)
        pick = torch.randperm(len(members), generator=g)[:per_class].tolist()
        chosen.extend(members[j] for j in pick)
    return sorted(chosen)


def subset_names(files: list[str]) -> list[str]:
    """How a subset file names each image: the file name when file names are unique in the split (ImageNet,
    SimCLR's lists), else `class/file`."""
    base = [Path(f).name for f in files]
    if len(set(base)) == len(base):
        return base
    return [f"{Path(f).parent.name}/{Path(f).name}" for f in files]


def read_subset_file(path: str | Path, files: list[str]) -> list[int]:
    """Positions in `files` of the images a subset file lists (blank lines and `#` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file '{path}' not found")
    by_base: dict[str, list[int]] = {}
    by_rel: dict[str, int] = {}
    for i, f in enumerate(files):
        p = Path(f)
        by_base.setdefault(p.name, []).append(i)
        by_rel[f"{p.parent.name}/{p.name}"] = i
    chosen: set[int] = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        parts = Path(name).parts
        if len(parts) > 1:
            rel = f"{parts[-2]}/{parts[-1]}"
            if rel not in by_rel:
                raise ValueError(f"{path}:{n}: '{name}' is not an image of the training split")
            chosen.add(by_rel[rel])
            continue
        hits = by_base.get(name, [])
        if len(hits) != 1:
            why = "is not an image of the training split" if not hits else \
                f"matches {len(hits)} images; write it as class/{name}"
            raise ValueError(f"{path}:{n}: '{name}' {why}")
        chosen.add(hits[0])
    if not chosen:
        raise ValueError(f"subset file '{path}' names no images")
    return sorted(chosen)


def write_subset_file(path: str | Path, files: list[str], subset: list[int]) -> Path:
    """One name per line (see `subset_names`), readable by `read_subset_file` and by SimCLR-style loaders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = subset_names(files)
    path.write_text("".join(f"{names[i]}\n" for i in subset))
    return path


def class_counts(labels: list[int], subset: list[int]) -> dict[int, int]:
    """{class: samples in the subset}."""
    return dict(sorted(Counter(int(labels[i]) for i in subset).items()))
