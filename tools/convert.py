"""Convert an ImageNet-layout folder into a format that feeds GPUs fast.

    python tools/convert.py SRC OUT --format {ffcv,shards} [--max-size 512] [--quality 90] [--compress-prob 0.5]
        [--workers N] [--limit N] [--splits train,val] [--shard-size BYTES] [--seed 0]
    python tools/convert.py --verify OUT

SRC is any dataset layout the tools accept (pipelines/sources.py LAYOUTS: train/ and val/ class folders, a flat
ImageNet val/ with LOC_val_solution.csv or the devkit's ground truth and meta.mat, or one folder of class folders).
OUT receives, per split:
    ffcv     OUT/SPLIT.beton                              (data.backend=ffcv, data.path=OUT)
    shards   OUT/SPLIT/SPLIT-000000.tar + .idx, ...       (data.backend=torch, data.path=OUT; DALI's webdataset reader)
and OUT/classes.json (class folder -> label, sorted like torchvision's ImageFolder, taken from train/),
OUT/SPLIT.samples.tsv (index, label, source file) and OUT/SPLIT.report.json (counts per class, bytes, time, and
every repaired or skipped file with the reason).

Files are written in a fixed seeded order (shards then mix classes); `--limit N` keeps the first N of that order.
Work happens in OUT/.SPLIT.work/ and is moved into place only when complete, so a half-written output never
looks finished. Re-running the same command resumes: shards from the last finished shard, ffcv from the last
scan checkpoint (the .beton itself is then written in one go).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from pathlib import Path


import numpy as np
import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text

from engine.cli import entry_point
from engine.runlog import make_console
from pipelines.shards import ShardWriter
from pipelines.sources import DEVKIT_TRUTH, LAYOUTS, VAL_SOLUTION, LayoutError, MissingSplit, list_split
from tools.convert_state import Journal, build_report, write_json_atomic
from tools.imageprep import BadImage, load_clean, to_jpeg

CHECKPOINT_EVERY = 512     # ffcv scan: records per journal checkpoint


class ConvertError(RuntimeError):
    """A problem with the input or OUT; the message names it and what to do."""


# ------------------------------------------------------------------------------------------ per-file work
_WORKER: dict = {}


def _init_worker(root: str, max_size: int, quality: int, encode: bool, in_pool: bool = True) -> None:
    if in_pool:
        torch.set_num_threads(1)
        # A forked worker inherits the parent's Python signal handlers (a training loop's SIGTERM handler only
        # sets a flag): restore the default so that Pool.terminate() stops it; Ctrl-C is the parent's to handle.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(root=Path(root), max_size=max_size, quality=quality, encode=encode)


def _prepare(task):
    """(record, JPEG bytes or None) for one source file; never raises for bad input."""
    pos, rel, label = task
    rec = {"pos": pos, "file": rel, "label": label, "status": "ok", "reason": "", "bytes_in": 0}
    if label < 0:
        rec.update(status="skipped", reason=f"no label in {VAL_SOLUTION} or {DEVKIT_TRUTH}")
        return rec, None
    try:
        data = (_WORKER["root"] / rel).read_bytes()
    except OSError as exc:
        rec.update(status="skipped", reason=f"unreadable file ({exc.strerror or exc})")
        return rec, None
    rec["bytes_in"] = len(data)
    try:
        img, repairs = load_clean(data, rel, _WORKER["max_size"] if _WORKER["encode"] else 0)
    except BadImage as exc:
        rec.update(status="skipped", reason=str(exc))
        return rec, None
    rec.update(status="repaired" if repairs else "ok", reason="; ".join(repairs))
    return rec, (to_jpeg(img, _WORKER["quality"]) if _WORKER["encode"] else None)


def _run(tasks, workers: int, initargs):
    """Results of `_prepare` over `tasks`, in order, from `workers` processes (inline when workers <= 1)."""
    if workers <= 1:
        _init_worker(*initargs, in_pool=False)
        yield from map(_prepare, tasks)
        return
    pool = mp.get_context("fork").Pool(workers, _init_worker, initargs)
    try:
        yield from pool.imap(_prepare, tasks, chunksize=8)
        pool.close()
        pool.join()
    finally:
        pool.terminate()


# ------------------------------------------------------------------------------------------------ driver
class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "- img/s", style="progress.data.speed")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def split_items(src: Path, split: str, seed: int, limit: int) -> tuple[list[tuple[str, int]], list[str]]:
    """(path relative to SRC, label) of every regular file of the split, in the seeded write order, and the
    class names (the train split's: every split shares its label index)."""
    try:
        files, labels, classes = list_split(src, split, exts=None)
    except MissingSplit:
        raise
    except LayoutError as exc:
        raise ConvertError(str(exc)) from None
    if not classes:
        raise ConvertError(f"'{src}/{split}.txt' is a file list; convert needs class folders "
                           f"({src}/{split}/<class>/*.JPEG)")
    items = [(str(Path(f).relative_to(src)), lab) for f, lab in zip(files, labels)]
    order = np.random.default_rng(seed).permutation(len(items))
    items = [items[k] for k in order]
    return (items[:limit] if limit > 0 else items), classes


def _settings(a, split: str, items) -> dict:
    digest = hashlib.sha1("\n".join(f"{f}\t{lab}" for f, lab in items).encode()).hexdigest()
    return {"format": a.format, "split": split, "max_size": a.max_size, "quality": a.quality,
            "compress_prob": a.compress_prob, "seed": a.seed, "limit": a.limit, "shard_size": a.shard_size,
            "files": len(items), "files_sha1": digest}


def convert_split(a, split: str, items: list[tuple[str, int]], classes: list[str], console: Console) -> dict:
    final = a.out / (f"{split}.beton" if a.format == "ffcv" else split)
    report_path, tsv_path = a.out / f"{split}.report.json", a.out / f"{split}.samples.tsv"
    work = a.out / f".{split}.work"
    if final.exists() and report_path.is_file():
        console.print(f"{split}: already converted ({final}); delete it to convert again")
        return json.loads(report_path.read_text())
    if final.exists() and not (work / "report.json").is_file():
        raise ConvertError(f"'{final}' exists but has no report '{report_path}' (another tool's output?); "
                           f"delete it and run again")
    work.mkdir(parents=True, exist_ok=True)
    settings = _settings(a, split, items)
    if (work / "settings.json").is_file() and json.loads((work / "settings.json").read_text()) != settings:
        raise ConvertError(f"'{work}' holds an interrupted conversion with other arguments or source files; "
                           f"re-run it with the same arguments, or delete '{work}' to start over")
    write_json_atomic(work / "settings.json", settings)
    journal = Journal(work / "journal.jsonl")
    if not final.exists():
        _write(a, split, items, classes, journal, work, console)
        written = [r for r in journal.records if r["status"] != "skipped"]
        (work / "samples.tsv").write_text("index\tlabel\tfile\n" + "".join(
            f"{i}\t{r['label']}\t{r['file']}\n" for i, r in enumerate(written)))
        out = work / ("data.beton" if a.format == "ffcv" else split)
        bytes_out = out.stat().st_size if a.format == "ffcv" else sum(f.stat().st_size for f in out.iterdir())
        seconds = {k: journal.state.get(k, 0.0) for k in ("prepare", "write")}
        seconds["total"] = sum(seconds.values())
        extra = {"shards": journal.state.get("shard_list", [])} if a.format == "shards" else {}
        report = build_report(fmt=a.format, split=split, source=str(a.src / split), output=final.name,
                              classes=classes, records=journal.records, args=settings, seconds=seconds,
                              workers=a.workers, bytes_out=bytes_out, extra=extra)
        write_json_atomic(work / "report.json", report)
        os.replace(out, final)
    os.replace(work / "samples.tsv", tsv_path)
    os.replace(work / "report.json", report_path)
    shutil.rmtree(work)
    return json.loads(report_path.read_text())


def _write(a, split, items, classes, journal: Journal, work: Path, console: Console) -> None:
    shards = a.format == "shards"
    t0, prev = time.time(), journal.state.get("prepare", 0.0)
    writer, shard_list = None, list(journal.state.get("shard_list", []))
    if shards:
        shard_dir = work / split
        shard_dir.mkdir(exist_ok=True)
        keep = {s["name"] for s in shard_list}
        for f in shard_dir.iterdir():             # shards after the last checkpoint are written again
            if f.name.split(".")[0] not in keep:
                f.unlink()

        def on_shard(name, samples, nbytes):
            shard_list.append({"name": name, "samples": samples, "bytes": nbytes})
            journal.commit(shard_list=shard_list, prepare=prev + time.time() - t0)

        writer = ShardWriter(shard_dir, split, a.shard_size, first_shard=len(shard_list), on_shard=on_shard)
    n_written = sum(r["status"] != "skipped" for r in journal.records)
    tasks = [(pos, rel, lab) for pos, (rel, lab) in enumerate(items) if pos >= journal.done]
    initargs = (str(a.src), a.max_size, a.quality, shards)
    with _progress(console) as progress:
        bar = progress.add_task(f"{split}: {'encode' if shards else 'scan'}", total=len(items),
                                completed=journal.done)
        for rec, payload in _run(tasks, a.workers, initargs):
            if rec["status"] != "skipped":
                if writer is not None:
                    writer.add(n_written, payload, rec["label"])
                n_written += 1
            journal.add(rec)
            if not shards and len(journal.pending) >= CHECKPOINT_EVERY:
                journal.commit(prepare=prev + time.time() - t0)
            progress.advance(bar)
        if writer is not None:
            writer.close()
        journal.commit(shard_list=shard_list, prepare=prev + time.time() - t0)
        if n_written == 0:
            raise ConvertError(f"{a.src / split}: none of {len(items)} files is a usable image; "
                               f"see {work / 'journal.jsonl'} for the reasons")
        if not shards:
            _write_beton(a, split, journal, work, progress)


def _write_beton(a, split, journal: Journal, work: Path, progress: Progress) -> None:
    from tools.convert_ffcv import write_beton
    accepted = [pos for pos, r in enumerate(journal.records) if r["status"] != "skipped"]
    bar = progress.add_task(f"{split}: write .beton", total=len(accepted))
    t0 = time.time()
    partial = work / "data.beton.partial"
    failed = write_beton(partial, a.src, [(journal.records[p]["file"], journal.records[p]["label"]) for p in accepted],
                         max_size=a.max_size, quality=a.quality, compress_prob=a.compress_prob,
                         workers=a.workers, seed=a.seed, on_progress=lambda n: progress.update(bar, completed=n))
    if failed:
        for i, reason in failed:
            journal.override(accepted[i], status="skipped", reason=f"failed while writing ({reason})")
        first = journal.records[accepted[failed[0][0]]]
        raise ConvertError(f"{len(failed)} file(s) changed since the scan and failed while writing the .beton "
                           f"(first: {first['file']}: {failed[0][1]}); they are now marked skipped: run the same "
                           f"command again")
    os.replace(partial, work / "data.beton")
    journal.commit(write=time.time() - t0, prepare=journal.state.get("prepare", 0.0))


def _summary(console: Console, out: Path, split: str, r: dict) -> None:
    console.print(f"{split}: {r['samples']:,} images ({r['repaired_count']} repaired, {r['skipped_count']} skipped) "
                  f"-> {out / r['output']}, {r['bytes_out'] / 1e6:,.1f} MB, {r['images_per_s'] or 0:,.0f} img/s "
                  f"({r['images_per_s_per_worker'] or 0:,.0f} per worker); report {out / f'{split}.report.json'}")
    for s in r["skipped"][:20]:
        console.print(f"  skipped {s['file']}: {s['reason']} (left out; listed in the report)")
    if len(r["skipped"]) > 20:
        console.print(f"  ... and {len(r['skipped']) - 20} more skipped files in the report")


@entry_point("convert.py")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("src", nargs="?", type=Path, help="ImageNet-layout root (train/, val/)")
    p.add_argument("out", nargs="?", type=Path, help="output folder")
    p.add_argument("--format", choices=["ffcv", "shards"])
    p.add_argument("--max-size", type=int, default=512, help="longer side of stored images, pixels (FFCV's "
                   "ImageNet recipe: 512; 256-384 for low-resolution training)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--compress-prob", type=float, default=0.5, help="ffcv: fraction of images stored as JPEG, "
                   "the rest as raw pixels (faster to decode, ~5x larger)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--limit", type=int, default=0, help="convert only the first N files of each split's order")
    p.add_argument("--splits", default="train,val", help="comma-separated; those present in SRC are converted")
    p.add_argument("--shard-size", type=float, default=1e9, help="shards: bytes per tar shard (about)")
    p.add_argument("--seed", type=int, default=0, help="seed of the write order")
    p.add_argument("--verify", type=Path, metavar="OUT", help="re-read a converted OUT and check it against "
                   "its reports")
    a = p.parse_args(argv)
    console = make_console()
    try:
        if a.verify is not None:
            from tools.convert_verify import verify
            return 0 if verify(a.verify, console) else 1
        if a.src is None or a.out is None or a.format is None:
            p.error("SRC, OUT and --format are required (or --verify OUT)")
        if a.max_size <= 0 or not 1 <= a.quality <= 100 or not 0 <= a.compress_prob <= 1:
            p.error("--max-size must be > 0, --quality in 1..100, --compress-prob in 0..1")
        a.shard_size = int(a.shard_size)
        if a.format == "ffcv":
            try:
                import tools.convert_ffcv  # noqa: F401 — FFCV takes seconds to import: do it before the scan
            except ImportError as exc:
                raise ConvertError(f"FFCV is not installed ({exc}); install it with `make install` or see README "
                                   f"'Installing FFCV'") from None
        if not a.src.is_dir():
            raise ConvertError(f"source folder '{a.src}' not found; expected {LAYOUTS}")
        scans = {}
        for split in a.splits.split(","):
            try:
                scans[split] = split_items(a.src, split, a.seed, a.limit)
            except MissingSplit as exc:
                missing = str(exc)
        if not scans:
            raise ConvertError(missing)
        classes = next(iter(scans.values()))[1]
        a.out.mkdir(parents=True, exist_ok=True)
        cls_path = a.out / "classes.json"
        index = {c: i for i, c in enumerate(classes)}
        if cls_path.is_file() and json.loads(cls_path.read_text()) != index:
            raise ConvertError(f"'{cls_path}' has another class index than {a.src}; use an empty OUT")
        write_json_atomic(cls_path, index)
        for split, (items, _) in scans.items():
            _summary(console, a.out, split, convert_split(a, split, items, classes, console))
        return 0
    except ConvertError as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
