"""Evaluate a trained checkpoint.

    python evaluate.py knn --checkpoint runs/demo/checkpoint.pt
    python evaluate.py knn,cluster --checkpoint runs/demo/checkpoint.pt [--config CFG] [key=value ...]

Protocols: knn (weighted kNN, k=20 and 200, T=0.07, on L2-normalised backbone features of the val split
against the train split) and cluster (a head classifier's argmax as cluster id: NMI, AMI, ARI, Hungarian ACC;
TWIST has one classifier, Self-Classifier one per entry of self_classifier.classes — pick with --classifier N).
Results go to a rich table and a JSON file beside the checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

PROTOCOLS = ("knn", "cluster")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a fasttwist checkpoint.")
    p.add_argument("protocols", help=f"comma-separated subset of {', '.join(PROTOCOLS)}")
    p.add_argument("--checkpoint", required=True, help="fasttwist checkpoint or torchvision backbone state_dict")
    p.add_argument("--config", default=None, help="YAML recipe (default: the one stored in the checkpoint)")
    p.add_argument("--out", default=None, help="JSON results file (default: next to the checkpoint)")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--ks", default="20,200", help="k values for kNN")
    p.add_argument("--classifier", type=int, default=0,
                   help="cluster: which head classifier's argmax to score (Self-Classifier: index into "
                        "self_classifier.classes; TWIST has only 0)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.path=/data/imagenet")
    return p.parse_intermixed_args(argv)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    args = parse_args(argv)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        print(f"evaluate.py: unknown protocol(s) {bad or args.protocols!r}; choose from {', '.join(PROTOCOLS)}",
              file=sys.stderr)
        return 2
    from engine.config import ConfigError, apply_overrides, load_config, to_dict
    from engine.distributed import init_distributed, shutdown
    from engine.features import extract, load_for_eval
    from engine.logging import console
    from engine.metrics import cluster_metrics, knn_accuracy
    from pipelines import build_pipeline
    from rich.table import Table

    ckpt_path = Path(args.checkpoint)
    try:
        base = load_config(args.config) if args.config else None
        model, cfg, has_head = load_for_eval(ckpt_path, base)
        apply_overrides(cfg, args.overrides)  # on top of the checkpoint's (or --config's) recipe
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"evaluate.py: {exc}", file=sys.stderr)
        return 2
    if "cluster" in protocols and not has_head:
        print("evaluate.py: 'cluster' needs the trained head; pass a fasttwist checkpoint", file=sys.stderr)
        return 2
    cluster = "cluster" in protocols
    try:
        if cluster:
            model.check_classifier(args.classifier)
    except ValueError as exc:
        print(f"evaluate.py: --classifier: {exc}", file=sys.stderr)
        return 2
    info = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min)
    t0 = time.time()
    try:
        val = extract(model, build_pipeline(cfg, cfg.data.val_split, info.rank, info.world_size, info.device,
                                            train=False), info.device, cluster, "val features", info.is_main,
                      args.classifier)
        metrics: dict[str, float] = {}
        if "knn" in protocols:
            train = extract(model, build_pipeline(cfg, cfg.data.train_split, info.rank, info.world_size,
                                                  info.device, train=False), info.device, False,
                            "train features", info.is_main)
            ks = tuple(int(k) for k in args.ks.split(","))
            metrics.update(knn_accuracy(train["features"], train["labels"], val["features"], val["labels"],
                                        ks=ks, temperature=args.temperature))
        if cluster:
            pred = val["logits"].argmax(dim=1)
            metrics.update({f"cluster_{k}": v for k, v in cluster_metrics(pred, val["labels"]).items()})
    finally:
        shutdown()
    if not info.is_main:
        return 0
    result = {"protocols": protocols, "checkpoint": str(ckpt_path), "checkpoint_sha256": file_hash(ckpt_path),
              "dataset": cfg.data.path, "split": cfg.data.val_split, "method": cfg.method,
              "classifier": args.classifier if cluster else None, "metrics": metrics,
              "seconds": round(time.time() - t0, 2), "config": to_dict(cfg)}
    out = Path(args.out) if args.out else ckpt_path.with_name(f"eval_{'_'.join(protocols)}.json")
    out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"fasttwist evaluation — {ckpt_path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.2f}" if "knn" in k else f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    console.print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
