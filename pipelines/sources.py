"""Where samples come from: ImageNet-layout folders and file lists; robust image decoding."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

# torchvision >= 0.29 marks its image codecs deprecated (in favour of torchcodec) but they remain the fastest
# decoders available here; silence the per-call notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def list_image_folder(root: str | Path, exts: set[str] | None = IMAGE_EXTS) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder semantics: one sub-folder per class, classes sorted by name -> label = position.
    Files whose extension is not in `exts` are left out (`exts=None`: every regular file, for tools that must
    report what they skip)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder '{root}' not found; build the demo with "
                                f"`python tools/demo_data.py data/demo` or set data.path")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if (exts is None or f.suffix.lower() in exts) and f.is_file():
                files.append(str(f))
                labels.append(label)
    if not files:
        raise FileNotFoundError(f"dataset folder '{root}' has no images in class sub-folders "
                                f"(expected {root}/<class>/*.jpg)")
    return files, labels, classes


def read_file_list(path: str | Path) -> tuple[list[str], list[int]]:
    """A text file with lines `relative/or/absolute/path.jpg LABEL`; relative paths are taken from the list's
    folder."""
    path = Path(path)
    files, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            name, label = line.rsplit(maxsplit=1)
            labels.append(int(label))
        except ValueError:
            raise ValueError(f"{path}:{n}: expected 'PATH LABEL', got {line!r}") from None
        files.append(str(path.parent / name) if not Path(name).is_absolute() else name)
    return files, labels


def load_source(root: str | Path, split: str) -> tuple[list[str], list[int]]:
    """`root/split` as an image folder, or `root/split.txt` as a file list."""
    root = Path(root)
    if (root / f"{split}.txt").is_file():
        return read_file_list(root / f"{split}.txt")
    files, labels, _ = list_image_folder(root / split)
    return files, labels


def decode_rgb(data: bytes, name: str = "<bytes>") -> torch.Tensor:
    """Decode by content (a PNG named .JPEG works) to uint8 (3, H, W). CMYK and other modes that
    torchvision's decoder rejects go through PIL."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(buf, mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    try:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            return arr.view(im.height, im.width, 3).permute(2, 0, 1).contiguous()
    except Exception as exc:
        raise ValueError(f"image '{name}' could not be decoded ({type(exc).__name__}); "
                         f"re-encode or remove it") from None
