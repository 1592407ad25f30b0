"""Draw a few training images with all their augmented views, from any backend, into one PNG.

    python tools/show_views.py --data data/demo --out views.png [--config configs/demo.yaml] [--n 4] [key=value ...]

Row i: the original image (left), then every view of it in spec order (global 1, global 2, local 1, ...), each
de-normalised and drawn at its true relative size (a 96 px local crop 96/224 as wide as a 224 px global: the point
of multi-crop); the title names the recipe, the backend and the epoch, and the columns are labelled with each
view's size. People judge augmentations by eye first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import entry_point
from engine.config import ConfigError, load_config
from pipelines import build_pipeline
from pipelines.sources import decode_rgb, load_source
from pipelines.spec import MultiCropSpec
from tools.image_grids import draw_views

ROOT = Path(__file__).resolve().parents[1]


def views_title(recipe: str, backend: str, epoch: int, spec: MultiCropSpec) -> str:
    """Two lines: what made the views, and what the columns hold."""
    sizes = spec.view_sizes()
    local = sizes[spec.num_global:]
    parts = [f"{spec.num_global} global views of {sizes[0]} px"]
    parts.append(f"{len(local)} local views of {local[0]} px" if local else "no local views")
    return (f"recipe {recipe}, {backend} backend, epoch {epoch}: each row one image and its views\n"
            f"{', '.join(parts)}, drawn at their true relative sizes")


@entry_point("show_views.py")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset root: train/ (and val/) class folders, or one folder of class folders")
    p.add_argument("--out", default="views.png")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--n", type=int, default=4, help="number of images (rows)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.backend=dali augment.num_local=6")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, [f"data.path={args.data}", f"data.batch_size={args.n}", "data.workers=0",
                                        "model.head_bn=bn",   # no model here: --n need not divide bunch_size
                                        *args.overrides])
    except ConfigError as exc:
        print(f"show_views.py: {exc}", file=sys.stderr)
        return 2
    pipe = build_pipeline(cfg, cfg.data.train_split)
    pipe.set_epoch(args.epoch)
    batch = next(iter(pipe))
    files, _ = load_source(cfg.data.path, cfg.data.train_split)  # batch indices are dataset indices
    originals = [decode_rgb(Path(files[i]).read_bytes(), files[i]) for i in batch.indices.tolist()]
    spec = MultiCropSpec.from_config(cfg.augment)
    draw_views(originals, batch.views, cfg.augment.mean, cfg.augment.std, args.out,
               views_title(Path(args.config).stem, cfg.data.backend, args.epoch, spec), spec.num_global)
    print(f"wrote {args.out}: {len(originals)} images x {len(batch.views)} views ({cfg.data.backend} backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
