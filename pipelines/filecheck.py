"""Unreadable image files, found and reported the same way by every backend.

Two places meet bad files (zero-byte files, text or other data under an image name, truncated JPEGs and PNGs,
directories named like images):
- Readers that decode in Python (the torch and pil backends, evaluation) try the file and, when it fails, take
  the next readable sample of the split in its place (`read_or_next`), so every batch keeps its size. The
  failure is queued in the process that met it (`note_bad_file`) and leaves it with the batch (`take_bad_files`,
  called by the collate function, in a DataLoader worker or not), so the main process can name each file once
  and count it, whichever worker met it.
- DALI cannot skip a sample: a file it cannot map or decode stops the whole pipeline. Its file list is therefore
  checked once at start-up (`check_files`: size, the format's magic bytes, the JPEG end-of-image marker / the PNG
  IEND chunk; one head and one tail read per file: 5-8 s for 1.28M files, BENCHMARKS.md) and every bad entry is
  replaced by the next good one (`replace_bad`), the same substitution the Python readers make at run time, so
  both deliver the same samples (a replacement brings its own label and index).

`BadFileLog` is the main process's side: it names each file once on stderr and counts them over all ranks (the
run's log records `skipped_files`).
"""
from __future__ import annotations

import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

TAIL = 32   # bytes at the end of a file searched for its end marker (allows a little trailing padding)
REPLACE_TRIES = 16

_pending: list[tuple[str, str]] = []   # this process's bad files not yet handed on with a batch


def jpeg_complete(tail: bytes) -> bool:
    """Whether a JPEG's last TAIL bytes hold its end-of-image marker (FF D9). Inside entropy-coded data every FF
    is followed by 00 or a restart marker, so a file cut short cannot end with FF D9 by chance."""
    return b"\xff\xd9" in tail[-TAIL:]


def _kind(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def check_file(path: str) -> str | None:
    """Why `path` cannot be a training image, or None when it looks like a complete image file. Plain
    descriptor calls (open, fstat, one head and one tail pread): no file object per file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return "a directory, not an image file"
        head = os.pread(fd, 16, 0)
        if not head:
            return "empty file (0 bytes)"
        kind = _kind(head)
        if kind is None:
            return f"not an image (starts with {head[:8]!r})"
        if kind in ("jpeg", "png"):
            tail = os.pread(fd, TAIL, max(0, st.st_size - TAIL))
            if kind == "jpeg" and not jpeg_complete(tail):
                return "truncated JPEG (no end-of-image marker)"
            if kind == "png" and b"IEND" not in tail:
                return "truncated PNG (no IEND chunk)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    finally:
        os.close(fd)
    return None


def check_files(files: list[str], threads: int = 1) -> dict[int, str]:
    """{position: reason} of the files `check_file` rejects, in chunks over `threads` threads: one pass of small
    reads (5-8 s for 1.28M files on a local disk with one thread; more threads only contend for the GIL there,
    but hide the latency of a network file system: BENCHMARKS.md)."""
    chunk = 2048

    def run(start: int) -> list[tuple[int, str]]:
        return [(i, r) for i in range(start, min(start + chunk, len(files))) if (r := check_file(files[i]))]

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return dict(x for part in pool.map(run, range(0, len(files), chunk)) for x in part)


def replace_bad(files: list[str], bad: dict[int, str]) -> list[int]:
    """The position read in place of each position: itself, or for a bad entry the next good one (wrapping),
    as `read_or_next` does at run time (a replacement is the other sample: its image, label and index)."""
    if len(bad) >= len(files):
        raise ValueError(f"none of the {len(files)} files is a readable image (first: '{files[0]}'); "
                         f"check data.path")
    take = list(range(len(files)))
    for i in bad:
        j = (i + 1) % len(files)
        while j in bad:
            j = (j + 1) % len(files)
        take[i] = j
    return take


def note_bad_file(path: str, reason: str | Exception) -> None:
    """Queue a file this process could not read (the next `take_bad_files` hands it on)."""
    if isinstance(reason, Exception):
        reason = f"{type(reason).__name__}: {reason}"
    _pending.append((str(path), str(reason)))


def take_bad_files() -> list[tuple[str, str]]:
    """The bad files this process met since the last call, as (path, reason)."""
    out = list(_pending)
    _pending.clear()
    return out


def read_or_next(n: int, i: int, load: Callable[[int], object], name: Callable[[int], str]):
    """`load(i)`, or, when sample i cannot be read or decoded, `load` of the next readable sample (each failure
    noted); gives up after REPLACE_TRIES consecutive bad files."""
    for attempt in range(REPLACE_TRIES):
        j = (i + attempt) % n
        try:
            return load(j)
        except (OSError, ValueError) as exc:
            note_bad_file(name(j), exc)
    raise RuntimeError(f"{REPLACE_TRIES} consecutive unreadable files from '{name(i)}'; check the dataset")


class BadFileLog:
    """The bad files met by one process (`add`), counted over all ranks (`total`) and each named once on stderr:
    at once by a single process; under DDP by rank 0 when `total` gathers the ranks' files (at log steps), so a
    file met by two ranks in different epochs is still named once."""

    def __init__(self, who: str = "fasttwist", announce: bool = True):
        self.who, self.announce = who, announce
        self.files: dict[str, str] = {}          # path -> reason, met by this process
        self.announced: set[str] = set()
        self._summed, self._union = 0, 0

    def add(self, items: Iterable[tuple[str, str]]) -> list[str]:
        """Record (path, reason) pairs; returns the paths this process had not met before (printed at once
        when `announce`)."""
        new = [(p, r) for p, r in dict(items).items() if p not in self.files]
        self.files.update(new)
        if self.announce:
            self._print(new)
        return [p for p, _ in new]

    def _print(self, pairs) -> None:
        for path, reason in pairs:
            if path not in self.announced:
                self.announced.add(path)
                print(f"{self.who}: skipped unreadable image {path} ({reason}); a readable sample took its place",
                      file=sys.stderr, flush=True)

    def __len__(self) -> int:
        return len(self.files)

    def total(self, device=None) -> int:
        """Distinct bad files met by all ranks together (a collective when distributed: every rank calls it at
        the same steps). One all-reduce of a count; the names travel only when some rank's count changed."""
        import torch
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return len(self.files)
        counts = torch.tensor([len(self.files)], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        if int(counts.item()) != self._summed:
            self._summed = int(counts.item())
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, sorted(self.files.items()))
            merged = dict(pair for part in parts for pair in part)
            self._union = len(merged)
            if dist.get_rank() == 0:
                self._print(sorted(merged.items()))
        return self._union
