"""Draw a run's training curves from its JSONL log: runs/NAME/curves.png.

    python tools/plot_run.py runs/NAME [--out curves.png]

Panels: the loss terms (TWIST kl, eh, he, total; Self-Classifier per classifier), learning rate, samples/s,
GPU memory (CUDA runs) against the step, the self-labeling phase shaded, and one panel per other logged scalar
(e.g. an online kNN monitor); legends sit outside the axes, step ticks are integers, and a panel with fewer than
2 points says so (the monitor's: how often it ran, from RUN/config.yaml). Reads log.jsonl (and config.yaml), so it
works on a run that is still going.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import entry_point
from tools.plots import draw_curves, read_log


def monitor_every(run: Path) -> int | None:
    """train.monitor_every_epochs from the run's config.yaml, when it has one (for the monitor panel's note)."""
    try:
        import yaml
        value = yaml.safe_load((run / "config.yaml").read_text())["train"]["monitor_every_epochs"]
    except Exception:   # no config beside the log, or an older layout: the panel says less
        return None
    return value if isinstance(value, int) and value > 0 else None


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
    panels = draw_curves(records, out, title=f"{args.run.name}: steps {records[0]['step']}-{records[-1]['step']}",
                         monitor_every=monitor_every(args.run))
    print(f"wrote {out} ({len(panels)} panels: {', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
