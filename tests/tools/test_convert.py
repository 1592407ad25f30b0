"""tools/convert.py: bad files, report, class index, shards with DALI index files, resume, --verify; shards read
back by the torch backend."""
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from pipelines import build_pipeline
from pipelines.shards import ShardDataset, shard_pairs
from tests.conftest import (BAD_FILES, CONVERT_MAX_SIZE, assert_close_to_reference, reference_image,
                            tiny_config)
from tools import convert
from tools.convert_state import Journal

ARGS = ["--max-size", str(CONVERT_MAX_SIZE), "--quality", "90", "--shard-size", "20000"]


def samples(out: Path, split: str = "train") -> list[tuple[int, str]]:
    rows = (out / f"{split}.samples.tsv").read_text().splitlines()[1:]
    return [(int(r.split("\t")[1]), r.split("\t")[2]) for r in rows]


@pytest.fixture(scope="module")
def shards_out(convert_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    assert convert.main([str(convert_source), str(out), "--format", "shards", "--workers", "2", *ARGS]) == 0
    return out


def test_report_lists_every_repaired_and_skipped_file(shards_out, convert_source):
    r = json.loads((shards_out / "train.report.json").read_text())
    assert (r["samples"], r["files_seen"], r["repaired_count"], r["skipped_count"]) == (64, 67, 3, 3)
    repaired = {Path(x["file"]).name: x["reason"] for x in r["repaired"]}
    skipped = {Path(x["file"]).name: x["reason"] for x in r["skipped"]}
    for name, fixed, reason in BAD_FILES:
        assert reason in (repaired if fixed else skipped)[name], name
    classes = json.loads((shards_out / "classes.json").read_text())
    assert list(classes) == sorted(d.name for d in (convert_source / "train").iterdir())
    assert list(classes.values()) == list(range(10))
    counts = list(r["counts"].values())
    assert counts == [9, 7] + [6] * 8      # class 0 holds the three repaired files, class 1 the shrunk one
    assert r["bytes_in"] > 0 and r["bytes_out"] == sum(f.stat().st_size for f in (shards_out / "train").iterdir())
    assert r["seconds"]["total"] > 0 and r["images_per_s"] > 0 and r["workers"] == 2
    assert json.loads((shards_out / "val.report.json").read_text())["samples"] == 20
    labels = [classes[Path(f).parent.name] for _, f in samples(shards_out)]
    assert [lab for lab, _ in samples(shards_out)] == labels


def test_index_files_are_what_dali_wds2idx_writes(shards_out):
    pairs = shard_pairs(shards_out / "train")
    assert len(pairs) > 1
    keys = []
    for tar, idx in pairs:
        lines = idx.read_text().splitlines()
        assert lines[0] == f"v1.2 {len(lines) - 1}"
        with tarfile.open(tar) as t:
            members = t.getmembers()
        assert all(m.isreg() and m.offset_data % 512 == 0 for m in members)
        grouped = {}        # wds2idx: members grouped by key, "<ext> <data offset> <size> <name>" per member
        for m in members:
            key, ext = m.name.split(".", 1)
            grouped.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
        assert lines[1:] == [" ".join(v) for v in grouped.values()]
        assert all([e.split()[0] for e in v] == ["jpg", "cls", "i64"] for v in grouped.values())
        keys += list(grouped)
    assert keys == [f"{i:08d}" for i in range(64)]


def test_shards_read_back_pixels_and_labels(shards_out, convert_source):
    ds = ShardDataset(shards_out / "train")
    rows = samples(shards_out)
    assert len(ds) == len(rows) == 64
    shapes = set()
    for i, (label, file) in enumerate(rows):
        img, lab, idx = ds[i]
        assert (lab, idx) == (label, i)
        assert_close_to_reference(img, reference_image(convert_source / file), file)
        shapes.add(tuple(img.shape))
    assert shapes == {(3, 48, 48), (3, 44, 64)}


def test_torch_backend_reads_shards_each_sample_once_across_ranks(shards_out, tmp_path):
    cfg = tiny_config(shards_out, tmp_path, "data.batch_size=8")
    labels = [lab for lab, _ in samples(shards_out)]
    seen = []
    for rank in range(2):
        pipe = build_pipeline(cfg, "train", rank=rank, world_size=2)
        pipe.set_epoch(3)
        batches = list(pipe)
        assert len(batches) == len(pipe) == 4
        assert [tuple(v.shape) for v in batches[0].views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
        for b in batches:
            assert b.labels.tolist() == [labels[i] for i in b.indices.tolist()]
            seen += b.indices.tolist()
    assert sorted(seen) == list(range(64))
    val = list(build_pipeline(cfg, "val", train=False))
    assert torch.equal(torch.cat([b.indices for b in val]), torch.arange(20))


def test_interrupted_run_resumes_to_identical_output(convert_source, tmp_path, monkeypatch):
    args = ["--format", "shards", "--workers", "1", "--splits", "train", *ARGS]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert convert.main([str(convert_source), str(ref), *args]) == 0
    real, calls = convert._prepare, []

    def interrupted(task):
        calls.append(task)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(convert, "_prepare", interrupted)
    assert convert.main([str(convert_source), str(out), *args]) == 130
    assert not (out / "train").exists() and not (out / "train.report.json").exists()
    assert 0 < Journal(out / ".train.work" / "journal.jsonl").done < 39
    monkeypatch.setattr(convert, "_prepare", real)
    assert convert.main([str(convert_source), str(out), *args]) == 0
    assert not (out / ".train.work").exists()
    names = sorted(f.name for f in (ref / "train").iterdir())
    assert names == sorted(f.name for f in (out / "train").iterdir())
    for name in names:
        assert (ref / "train" / name).read_bytes() == (out / "train" / name).read_bytes(), name
    a, b = (json.loads((d / "train.report.json").read_text()) for d in (ref, out))
    assert (a["counts"], a["repaired"], a["skipped"]) == (b["counts"], b["repaired"], b["skipped"])
    assert convert.main([str(convert_source), str(out), *args]) == 0      # finished: nothing to do


def test_verify_passes_and_catches_a_wrong_label(shards_out, tmp_path, capsys):
    assert convert.main(["--verify", str(shards_out)]) == 0
    assert "OK train: 64 samples" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(shards_out, copy)
    tsv = copy / "train.samples.tsv"
    lines = tsv.read_text().splitlines()
    i, lab, f = lines[1].split("\t")
    lines[1] = f"{i}\t{(int(lab) + 1) % 10}\t{f}"
    tsv.write_text("\n".join(lines) + "\n")
    assert convert.main(["--verify", str(copy)]) == 1
    assert "FAIL train" in capsys.readouterr().out


def test_bad_arguments_get_one_clear_line(convert_source, tmp_path, capsys):
    assert convert.main([str(tmp_path / "missing"), str(tmp_path / "o"), "--format", "shards"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "train/<class>" in err
    src = tmp_path / "src"
    shutil.copytree(convert_source, src)
    (src / "val" / "zz_extra").mkdir()
    assert convert.main([str(src), str(tmp_path / "o2"), "--format", "shards", "--splits", "val,train"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zz_extra" in err and "not in train/" in err


def test_journal_trusts_only_records_before_the_last_checkpoint(tmp_path):
    j = Journal(tmp_path / "journal.jsonl")
    for i in range(3):
        j.add({"pos": i})
    j.commit(upto=2, shards=1)
    with open(j.path, "a") as f:                     # a crash while writing the next checkpoint
        f.write('{"pos": 2}\n{"checkpoint": 3, "sha')
    again = Journal(j.path)
    assert [r["pos"] for r in again.records] == [0, 1] and again.state["shards"] == 1 and again.done == 2


def test_pool_workers_can_be_terminated_when_the_parent_handles_sigterm():
    """Forked workers inherit the parent's Python signal handlers; a training loop's SIGTERM handler only sets a
    flag, which would make Pool.terminate() wait forever on a worker. The worker initializer restores SIGTERM."""
    import multiprocessing as mp
    import signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with mp.get_context("fork").Pool(1, convert._init_worker, ("/", 0, 90, False)) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
            assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
