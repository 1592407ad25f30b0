"""Unreadable files in a raw image folder: found, reported once, replaced, counted — for every backend that reads
image files (torch, pil, dali on the CPU), through a whole training run."""
import json
from pathlib import Path

import pytest
import torch

from engine.trainer import train
from pipelines import build_pipeline
from pipelines.order import EpochSampler
from pipelines.filecheck import BadFileLog, check_file, check_files, replace_bad
from pipelines.sources import load_source
from tests.conftest import TRAINING_BAD_FILES, tiny_config

BAD = sorted(name for name, readable in TRAINING_BAD_FILES if not readable)


def bad_names(text: str) -> list[str]:
    """The file names a run's stderr reports as skipped, one entry per report line."""
    return sorted(Path(line.split("skipped unreadable image ")[1].split(" (")[0]).name
                  for line in text.splitlines() if "skipped unreadable image" in line)


def test_check_file_tells_each_kind(bad_folder):
    cls = sorted((bad_folder / "train").iterdir())[0]
    reasons = {name: check_file(str(cls / name)) for name, _ in TRAINING_BAD_FILES}
    assert "empty" in reasons["empty.JPEG"]
    assert "not an image" in reasons["text.JPEG"]
    assert "truncated JPEG" in reasons["truncated.JPEG"]
    assert "directory" in reasons["folder.JPEG"]
    for name, readable in TRAINING_BAD_FILES:
        assert (reasons[name] is None) == readable, (name, reasons[name])
    good = next(cls.glob("*.jpg"))
    assert check_file(str(good)) is None
    assert "unreadable" in check_file(str(cls / "missing.JPEG"))


def test_check_files_finds_exactly_the_bad_ones_and_replace_takes_the_next_good(bad_folder):
    files, _ = load_source(bad_folder, "train")
    bad = check_files(files, threads=3)
    assert sorted(Path(files[i]).name for i in bad) == BAD
    take = replace_bad(files, bad)
    assert len(take) == len(files)
    for i, j in enumerate(take):
        if i in bad:
            assert j == next(k % len(files) for k in range(i + 1, i + len(files)) if k % len(files) not in bad)
        else:
            assert j == i
    with pytest.raises(ValueError, match="none of the 2 files"):
        replace_bad(files[:2], {0: "x", 1: "y"})


def test_bad_file_log_names_each_file_once(capfd):
    log = BadFileLog()
    assert log.add([("/d/a.JPEG", "empty"), ("/d/b.JPEG", "text")]) == ["/d/a.JPEG", "/d/b.JPEG"]
    assert log.add([("/d/a.JPEG", "empty")]) == []
    assert len(log) == 2 and log.total() == 2
    assert bad_names(capfd.readouterr().err) == ["a.JPEG", "b.JPEG"]


@pytest.mark.parametrize("backend", ["torch", "pil", "dali"])
def test_every_batch_keeps_its_size_and_reads_no_bad_file(bad_folder, tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    extra = ("data.dali.threads=1", "data.dali.prefetch=1") if backend == "dali" else ()
    cfg = tiny_config(bad_folder, tmp_path, f"data.backend={backend}", *extra)
    files, labels = load_source(bad_folder, "train")
    pipe = build_pipeline(cfg, "train")
    pipe.set_epoch(0)
    batches = list(pipe)
    assert len(batches) == len(pipe) == len(files) // 16
    assert all(len(b) == 16 and b.views[0].shape[0] == 16 for b in batches)
    assert all(torch.isfinite(v).all() for b in batches for v in b.views)
    # the epoch's order, each bad position delivering the next good sample (its index and label)
    sampler = EpochSampler(len(files), shuffle=True, seed=cfg.train.seed)
    order = sampler.indices()[:len(batches) * 16]
    take = replace_bad(files, check_files(files))
    got = torch.cat([b.indices for b in batches]).tolist()
    assert got == [take[i] for i in order]
    assert torch.cat([b.labels for b in batches]).tolist() == [labels[i] for i in got]
    reported = sorted({Path(p).name for b in batches for p, _ in b.skipped})
    # a bad position is tried, then each next one up to its replacement (consecutive bad files are all met)
    met = sorted({Path(files[k % len(files)]).name for i in order if take[i] != i
                  for k in range(i, i + (take[i] - i) % len(files))})
    assert met and set(met) <= set(BAD)
    assert reported == (BAD if backend == "dali" else met)   # dali: the start-up check reports every one


@pytest.mark.parametrize("backend,workers", [("torch", 2), ("pil", 2), ("dali", 0)])
def test_training_survives_bad_files_names_each_once_and_logs_the_count(bad_folder, tmp_path, capfd, backend,
                                                                        workers):
    """Two epochs (each meets every bad file): all steps run, each bad file is named once on stderr and the
    log counts them."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    extra = ("data.dali.threads=1", "data.dali.prefetch=1") if backend == "dali" else ()
    cfg = tiny_config(bad_folder, tmp_path, f"data.backend={backend}", f"data.workers={workers}",
                      "augment.num_local=0", *extra)
    files, _ = load_source(bad_folder, "train")
    result = train(cfg)
    assert result["global_step"] == 2 * (len(files) // 16)
    assert bad_names(capfd.readouterr().err) == BAD
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_files"] == len(BAD)
    assert all(r["skipped_files"] <= len(BAD) for r in rows)


def test_two_ranks_count_the_union_and_rank_zero_names_each_once(bad_folder, tmp_path):
    """DDP (2 gloo processes), 2 epochs: the ranks meet different bad files in each epoch (and some twice); the
    log counts the distinct files of both ranks and stderr names each once."""
    import os
    import socket
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ddp"
    args = [f"data.path={bad_folder}", f"train.out_dir={run}", "data.batch_size=16", "data.workers=1",
            "augment.global_size=32", "augment.num_local=0", "model.head_hidden=32", "model.head_dim=8",
            "train.epochs=2", "train.log_every=2", "train.device=cpu", "train.monitor_every_epochs=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", "train.py", "--config", "configs/demo.yaml", *args],
                       cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert bad_names(r.stderr) == BAD
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_files"] == len(BAD) and rows[-1]["step"] == 2 * (64 // 16)   # ceil(127 / 2) per rank
