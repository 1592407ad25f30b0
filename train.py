"""Train TWIST.

    python train.py --config configs/demo.yaml [key=value ...] [--resume auto|PATH] [key=value ...] [--debug]
    torchrun --nproc_per_node=8 train.py --config configs/rn50_multicrop.yaml data.path=/data/imagenet
"""
from __future__ import annotations

import argparse
import sys

from engine.cli import entry_point
from engine.config import load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train TWIST (arXiv 2110.07402).")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument("--resume", default="", help="'auto' (continue the run folder's checkpoint if any) or a path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.3 train.epochs=10")
    return p.parse_intermixed_args(argv)   # overrides on either side of the flags


@entry_point("train.py")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from engine.distributed import shutdown
    from engine.faults import NonFiniteLoss
    from engine.trainer import train
    try:
        result = train(cfg, resume=args.resume or None)
    except NonFiniteLoss as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 3
    finally:
        shutdown()
    if result["is_main"]:   # one closing line per run, not one per process
        print(f"done: step {result['global_step']}, checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
