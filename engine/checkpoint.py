"""Checkpoints: atomic writes (temp file + fsync + rename), safe loads (weights_only=True)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CKPT_NAME = "checkpoint.pt"


def save_atomic(obj, path: str | Path) -> Path:
    """Write `obj` with torch.save so that `path` is either the old file or the complete new one, never a
    half-written file (a crash or a full disk while saving leaves the previous checkpoint usable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; check the path or train first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupted or foreign file: one clear line
        raise RuntimeError(f"checkpoint '{path}' could not be read ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); it may be truncated or not a "
                           f"fasttwist/torch checkpoint") from None


def resolve_resume(resume: str | None, out_dir: str | Path) -> Path | None:
    """`--resume auto` -> the run folder's checkpoint if present; a path -> that file; None/'' -> None."""
    if not resume:
        return None
    if resume == "auto":
        cand = Path(out_dir) / CKPT_NAME
        return cand if cand.is_file() else None
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
