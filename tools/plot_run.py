"""Draw a run's training curves from its JSONL log: runs/NAME/curves.png.

    python tools/plot_run.py runs/NAME [--out curves.png]

Panels: the loss terms (TWIST kl, eh, he, total; Self-Classifier per classifier), learning rate, samples/s,
GPU memory (CUDA runs) against the step, the self-labeling phase shaded, and one panel per other logged scalar
(e.g. an online kNN monitor). Reads log.jsonl only, so it works on a run that is still going.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import entry_point
from tools.plots import draw_curves, read_log


@entry_point("plot_run.py")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder (train.out_dir) holding log.jsonl")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN/curves.png)")
    args = p.parse_args(argv)
    try:
        records = read_log(args.run / "log.jsonl")
    except (FileNotFoundError, ValueError) as exc:
        print(f"plot_run.py: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.run / "curves.png"
    panels = draw_curves(records, out, title=f"{args.run.name}: steps {records[0]['step']}-{records[-1]['step']}")
    print(f"wrote {out} ({len(panels)} panels: {', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
