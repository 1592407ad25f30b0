"""Where samples come from: ImageNet-layout folders and file lists; robust image decoding."""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from pipelines.filecheck import read_or_next

# torchvision >= 0.29 marks its image codecs deprecated (in favour of torchcodec) but they remain the fastest
# decoders available here; silence the per-call notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


LAYOUTS = ("ROOT/train/<class>/*.JPEG (and ROOT/val/<class>/ or a flat ROOT/val/ with ROOT/LOC_val_solution.csv "
           "or the devkit's ILSVRC2012_validation_ground_truth.txt and meta.mat), ROOT/SPLIT.txt file lists, "
           "or ROOT/<class>/*.JPEG")
HOLDOUT_EVERY = 10          # a single folder of class folders: 1 file in 10 per class is the val split
VAL_SOLUTION = "LOC_val_solution.csv"   # ImageNet's flat val/ labels (Kaggle's ILSVRC download)
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"  # or the devkit's: one ILSVRC2012_ID per val image,
DEVKIT_META = "meta.mat"                                # mapped to synsets (WNIDs) by meta.mat
DEVKIT_DATA = "ILSVRC2012_devkit_t12/data"              # where the devkit archive unpacks them


class LayoutError(FileNotFoundError):
    """A dataset path that matches none of the accepted layouts (the message names the path and LAYOUTS)."""


class MissingSplit(LayoutError):
    """A dataset root, valid otherwise, without the requested split."""


def _not_found(root: Path) -> LayoutError:
    """A dataset root that does not exist; building the demo is the fix only when the demo is what was asked for."""
    fix = (f"build it with `python tools/demo_data.py {root}`" if root.name == "demo"
           else "set data.path (or --data) to an existing dataset folder")
    return LayoutError(f"dataset folder '{root}' not found; {fix} (layouts: {LAYOUTS})")


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []


def list_image_folder(root: str | Path, exts: set[str] | None = IMAGE_EXTS,
                      classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder semantics: one sub-folder per class, classes sorted by name -> label = position (or the
    position in `classes`, e.g. the train split's, so that every split shares one label index).
    Files whose extension is not in `exts` are left out (`exts=None`: every regular file, for tools that must
    report what they skip). Entries with an image extension are kept without a stat (one fewer system call per
    file at ImageNet scale): one that is not a readable image file — a directory named x.JPEG included — is
    reported and replaced when read (pipelines/filecheck.py)."""
    root = Path(root)
    if not root.is_dir():
        raise _not_found(root)
    own = _class_dirs(root)
    classes = own if classes is None else classes
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in own if c not in index]
    if unknown:
        raise LayoutError(f"'{root}': class folder(s) {', '.join(unknown[:5])} are not in train/ "
                          f"(every split must use the train classes)")
    files, labels = [], []
    for cls in own:
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() in exts if exts is not None else f.is_file():
                files.append(str(f))
                labels.append(index[cls])
    if not files:
        raise LayoutError(f"dataset folder '{root}' has no images in class sub-folders "
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


def read_val_solution(csv: Path, folder: Path, classes: list[str],
                      exts: set[str] | None = IMAGE_EXTS) -> tuple[list[str], list[int]]:
    """A flat folder of images labelled by ImageNet's `LOC_val_solution.csv` (`ImageId,PredictionString`, the
    first word of the prediction string is the synset, i.e. the train class folder name)."""
    index = {c: i for i, c in enumerate(classes)}
    synset = {}
    for n, line in enumerate(csv.read_text().splitlines()[1:], 2):
        if line.strip():
            image, _, pred = line.partition(",")
            if not pred.split() or pred.split()[0] not in index:
                raise LayoutError(f"{csv}:{n}: class {pred.split()[:1]} is not a train class folder")
            synset[image.strip()] = index[pred.split()[0]]
    return _label_flat_folder(folder, synset, csv, exts)


def read_devkit_synsets(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the devkit's `meta.mat` (struct array `synsets`: ILSVRC2012_ID, WNID, words,
    ...; the 1000 classes are IDs 1-1000, the rows above are WordNet ancestors)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise LayoutError(f"{meta}: reading the devkit's {DEVKIT_META} needs scipy (pip install scipy); or label "
                          f"the flat val/ with {VAL_SOLUTION}") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"].reshape(-1)
        return {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
    except Exception as exc:            # not a MAT file, no 'synsets', fields missing or of another kind
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise LayoutError(f"{meta}: expected the ILSVRC2012 devkit's {DEVKIT_META}, a struct array 'synsets' with "
                          f"fields ILSVRC2012_ID and WNID ({why})") from None


def read_devkit_truth(truth: Path, meta: Path, folder: Path, classes: list[str],
                      exts: set[str] | None = IMAGE_EXTS) -> tuple[list[str], list[int]]:
    """A flat folder of images labelled by the devkit: line k of `ILSVRC2012_validation_ground_truth.txt` is the
    ILSVRC2012_ID of ILSVRC2012_val_{k:08d}.JPEG (the val files in name order); meta.mat maps the ID to its WNID,
    i.e. the train class folder name."""
    index = {c: i for i, c in enumerate(classes)}
    wnid_of = read_devkit_synsets(meta)
    label_of = {}
    for n, line in enumerate(truth.read_text().rstrip().splitlines(), 1):
        try:
            sid = int(line)
        except ValueError:
            raise LayoutError(f"{truth}:{n}: expected one ILSVRC2012_ID (1-1000) per line, got {line.strip()!r}"
                              ) from None
        wnid = wnid_of.get(sid)
        if wnid is None:
            raise LayoutError(f"{truth}:{n}: ILSVRC2012_ID {sid} is not in {meta}")
        if wnid not in index:
            raise LayoutError(f"{truth}:{n}: ILSVRC2012_ID {sid} is {wnid} ({meta}), not a train class folder")
        label_of[f"ILSVRC2012_val_{n:08d}"] = index[wnid]
    return _label_flat_folder(folder, label_of, truth, exts)


def _label_flat_folder(folder: Path, label_of: dict[str, int], source: Path,
                       exts: set[str] | None) -> tuple[list[str], list[int]]:
    """Files of a flat folder, labelled by file name without extension (`label_of`, read from `source`)."""
    files, labels = [], []
    for f in sorted(folder.iterdir()):
        if f.is_file() and (exts is None or f.suffix.lower() in exts):
            if f.stem not in label_of and exts is not None:
                raise LayoutError(f"{f}: no label in {source}; add it or remove the file")
            files.append(str(f))
            labels.append(label_of.get(f.stem, -1))
    return files, labels


def _flat_labels(root: Path, folder: Path, classes: list[str], exts: set[str] | None):
    """Labels of a flat split folder: LOC_val_solution.csv, else the devkit's ground truth and meta.mat, looked
    for in ROOT, the split folder and the folder above, each also under ILSVRC2012_devkit_t12/data/."""
    places = [d / sub for d in (root, folder, root.parent) for sub in ("", DEVKIT_DATA)]

    def first(name: str, dirs) -> Path | None:
        return next((d / name for d in dirs if (d / name).is_file()), None)

    csv = first(VAL_SOLUTION, places)
    if csv is not None:
        return read_val_solution(csv, folder, classes, exts)
    truth = first(DEVKIT_TRUTH, places)
    if truth is None:
        raise LayoutError(f"'{folder}' holds no class folders and neither {VAL_SOLUTION} nor {DEVKIT_TRUTH} was "
                          f"found in '{root}', '{folder}' or '{root.parent}' (or their {DEVKIT_DATA}/); "
                          f"expected {LAYOUTS}")
    meta = first(DEVKIT_META, (truth.parent, *places))
    if meta is None:
        raise LayoutError(f"{truth} needs the devkit's {DEVKIT_META} (ILSVRC2012_ID -> WNID) beside it or in "
                          f"{root}/{DEVKIT_DATA}")
    return read_devkit_truth(truth, meta, folder, classes, exts)


def list_split(root: str | Path, split: str, exts: set[str] | None = IMAGE_EXTS
               ) -> tuple[list[str], list[int], list[str]]:
    """Files, labels and class names of one split, for every layout the tools accept (LAYOUTS):
    `ROOT/SPLIT.txt` (a file list; no class names), `ROOT/SPLIT/<class>/` (labels from the train split's
    classes), a flat `ROOT/SPLIT/` labelled by `LOC_val_solution.csv` or by the devkit's ground truth and
    meta.mat (see _flat_labels for where they are looked for), or a single folder of class folders whose every
    HOLDOUT_EVERY-th file per class forms the val split (any split name but 'train')."""
    root = Path(root)
    if (root / f"{split}.txt").is_file():
        files, labels = read_file_list(root / f"{split}.txt")
        return files, labels, []
    train_classes = _class_dirs(root / "train")
    folder = root / split
    if folder.is_dir() and _class_dirs(folder):
        return list_image_folder(folder, exts, train_classes or None)
    if folder.is_dir() and train_classes:
        return (*_flat_labels(root, folder, train_classes, exts), train_classes)
    if not (root / "train").exists() and not (root / "val").exists() and _class_dirs(root):
        files, labels, classes = list_image_folder(root, exts)
        rank = [0] * len(files)
        for k in range(1, len(files)):
            rank[k] = rank[k - 1] + 1 if labels[k] == labels[k - 1] else 0
        keep = [k for k in range(len(files)) if (rank[k] % HOLDOUT_EVERY == 0) == (split != "train")]
        return [files[k] for k in keep], [labels[k] for k in keep], classes
    if not root.is_dir():
        raise _not_found(root)
    if folder.is_dir():   # files straight in SPLIT/ with no train classes to label them by
        n = sum(1 for f in folder.iterdir() if f.is_file())
        raise LayoutError(f"'{folder}' holds {n} files but no class folders; move each class's images into "
                          f"{folder}/<class>/ (labels are the folder names), or see the layouts: {LAYOUTS}")
    raise MissingSplit(f"'{root}' has no '{split}' split; expected {LAYOUTS}")


def load_source(root: str | Path, split: str) -> tuple[list[str], list[int]]:
    """Files and labels of `split` under `root` (see list_split)."""
    files, labels, _ = list_split(root, split)
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





class ImageDataset(Dataset):
    """(image, label, index) from file paths. The image is decoded uint8 (3,H,W) (then `transform`ed), or,
    with `decode=False`, the file's raw bytes as a uint8 tensor for decoding on the GPU."""

    def __init__(self, files: list[str], labels: list[int], transform=None, decode: bool = True):
        self.files, self.labels, self.transform, self.decode = files, labels, transform, decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        """A file that cannot be read or decoded is replaced by the next readable sample and noted for the
        main process to report (pipelines/filecheck.py) — a run never dies on one bad JPEG."""
        return read_or_next(len(self.files), i, self._load, lambda j: self.files[j])

    def _read(self, i: int) -> tuple[bytes, int]:
        """Sample i's encoded image and label (`pipelines.shards.ShardDataset` reads them from tar shards)."""
        with open(self.files[i], "rb") as f:
            return f.read(), self.labels[i]

    def _load(self, i: int):
        data, label = self._read(i)
        if not self.decode:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, i
        img = decode_rgb(data, self.files[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, label, i

