"""Checkpoints: atomic writes (temp file + fsync + rename), safe loads (weights_only=True), kept copies.

A run folder holds the rolling `checkpoint.pt` (rewritten at every save) and, with `train.keep_every_epochs`,
kept copies `checkpoint_e0100.pt` (the state after 100 epochs), of which the newest `train.keep_last` stay.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

CKPT_NAME = "checkpoint.pt"
KEPT_PATTERN = re.compile(r"checkpoint_e(\d+)\.pt")


@contextlib.contextmanager
def _replacing(path: Path):
    """A temporary name beside `path`, renamed onto `path` when the block succeeds and removed when it fails:
    `path` is always either the old file or the complete new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj, path: str | Path) -> Path:
    """Write `obj` with torch.save so that `path` is either the old file or the complete new one, never a
    half-written file (a crash or a full disk while saving leaves the previous checkpoint usable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return path


class CheckpointError(RuntimeError, ValueError):
    """A file that is not a readable checkpoint: the user's path, so a ValueError too (engine/cli.py prints it as
    one line); a RuntimeError as it always was for callers that catch that."""


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; check the path or train first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupted or foreign file: one clear line
        raise CheckpointError(f"checkpoint '{path}' could not be read ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); it may be truncated or not a "
                           f"fasttwist/torch checkpoint") from None


def kept_name(epoch: int) -> str:
    return f"checkpoint_e{epoch:04d}.pt"


def kept_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the kept checkpoints in a run folder, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := KEPT_PATTERN.fullmatch(p.name)) and p.is_file()]
    return sorted(found)


def keep_copy(src: str | Path, dst: str | Path) -> Path:
    """Make `dst` an atomic copy of the finished checkpoint `src`: a hard link when the file system allows it
    (no second write; the rolling file is later replaced by a new inode, so the link keeps this content),
    else a byte copy, flushed and renamed into place."""
    src, dst = Path(src), Path(dst)
    with _replacing(dst) as tmp:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network/FUSE file systems)
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 24)
                fout.flush()
                os.fsync(fout.fileno())
    return dst


def prune_kept(out_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` kept checkpoints (0: keep them all); returns what was deleted."""
    if keep_last <= 0:
        return []
    old = [p for _, p in kept_checkpoints(out_dir)[:-keep_last]]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def resolve_resume(resume: str | None, out_dir: str | Path) -> Path | None:
    """`--resume auto` -> the newest checkpoint of the run folder: the rolling `checkpoint.pt` (every save
    rewrites it, kept copies are made from it), else the highest-epoch kept copy, else None (a fresh start);
    a path -> that file; None/'' -> None."""
    if not resume:
        return None
    if resume == "auto":
        cand = Path(out_dir) / CKPT_NAME
        if cand.is_file():
            return cand
        kept = kept_checkpoints(out_dir)
        return kept[-1][1] if kept else None
    return Path(resume)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (what checkpoints store)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
