"""Evaluate a trained checkpoint (a fasttwist checkpoint, a released TWIST or Self-Classifier checkpoint, or a
torchvision-format backbone state_dict).

    python evaluate.py linear --checkpoint runs/demo/checkpoint.pt [--cached-features]
    python evaluate.py semi --train-percent 1 --checkpoint CKPT [--subset-file 1percent.txt]
    python evaluate.py knn,cluster --checkpoint CKPT [--config CFG] [key=value ...]
    python evaluate.py cluster --checkpoint CKPT --gallery clusters.png
    python evaluate.py knn,cluster,linear --cached-features --baseline init,pixels --checkpoint CKPT
    torchrun --nproc_per_node=8 evaluate.py linear --checkpoint CKPT data.path=/data/imagenet

Protocols (comma-separate several; features are extracted once and shared):
  linear   frozen backbone + linear classifier, RandomResizedCrop+flip; final and best top-1/top-5; the official
           protocol of the checkpoint's method and architecture (TWIST ResNet, TWIST ViT-S/B, Self-Classifier)
  semi     backbone + classifier fine-tuned on 1/10/100% of the labels (BN in train mode as officially: --bn)
  knn      weighted kNN of val against train features (TWIST: k 20 and 200, T 0.07, the common protocol: the
           official TWIST code has none; Self-Classifier: its knn_eval.py, k 10, 20, 100, 200, T 0.1)
  cluster  a head classifier's argmax as cluster id: NMI, AMI, ARI, Hungarian ACC, clusters used (TWIST has
           one classifier; Self-Classifier one per entry of self_classifier.classes: --classifier N)
Baselines (--baseline init,pixels): the same protocols on the architecture at initialisation (same seed) and
on raw pixels (kNN / cached linear on the flattened, normalised eval view), as extra columns and under
`baseline` in the results.
Evaluation hyper-parameters are flags whose defaults are the official settings (evaluation/official.py); linear
and semi train at the protocol's global batch (--batch-size), divided over the processes, or with the largest
batch a smaller labelled set fills (one printed line says so); learning rates are per 256 of the global batch.
Data, model, precision and the feature-extraction batch (data.batch_size, per process) come from the config,
overridable with dotted keys. Results: a table and `eval_<protocols>.json` next to the checkpoint (or --out).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from engine.cli import entry_point

PROTOCOLS = ("linear", "semi", "knn", "cluster")


def parse_args(argv=None):
    from evaluation.official import describe
    p = argparse.ArgumentParser(description="Evaluate a fasttwist checkpoint.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="official linear / semi protocols, picked by method and model.arch "
                                       "(evaluation/official.py):\n" + describe())
    p.add_argument("protocols", help=f"one or a comma-separated list of {', '.join(PROTOCOLS)}")
    p.add_argument("--checkpoint", required=True, help="fasttwist checkpoint or torchvision backbone state_dict")
    p.add_argument("--config", default=None, help="YAML recipe (default: the one stored in the checkpoint)")
    p.add_argument("--out", default=None, help="JSON results file (default: next to the checkpoint)")
    p.add_argument("--classifier", type=int, default=0,
                   help="cluster: which head classifier's argmax to score (Self-Classifier: index into "
                        "self_classifier.classes; TWIST has only 0)")
    p.add_argument("--gallery", default=None, metavar="PNG", help="cluster: draw the largest clusters, a row of "
                   "the images the head is most confident about each (with the majority true label)")
    p.add_argument("--baseline", default="", help="comma-separated reference points evaluated beside the "
                   "checkpoint: init (same architecture at initialisation, same seed), pixels (raw eval-view "
                   "pixels; knn and cached linear only)")
    k = p.add_argument_group("knn")
    k.add_argument("--ks", default=None, help="k values (default: TWIST 20,200; Self-Classifier 10,20,100,200)")
    k.add_argument("--temperature", type=float, default=None, help="similarity temperature (default: TWIST "
                   "0.07; Self-Classifier 0.1)")
    p.add_argument("--surplus-clusters", choices=("wrong", "best"), default=None,
                   help="cluster ACC with more clusters than classes: unmatched clusters count as wrong (TWIST's "
                        "default) or each maps to its most frequent label (Self-Classifier's default)")
    c = p.add_argument_group("linear and semi (defaults: the official settings of each protocol)")
    c.add_argument("--epochs", type=int, default=None, help="linear 100, semi 20 (1%%, 10%%) / 30 (100%%)")
    c.add_argument("--lr-classifier", type=float, default=None, help="per 256 samples; linear: TWIST ResNet 0.05 "
                   "(official 0.2 at batch 1024), ViT-S 0.02, ViT-B 0.0015, Self-Classifier 0.05 (0.8 at 4096); "
                   "semi 0.2")
    c.add_argument("--lr-backbone", type=float, default=None, help="semi, per 256 samples; 0.04 at 1%%, 0.02 "
                   "at 10%%, 0.01 at 100%%")
    c.add_argument("--weight-decay", type=float, default=None, help="0")
    c.add_argument("--batch-size", type=int, default=None, help="global training batch of linear and semi "
                   "(default: the protocol's: linear 1024, Self-Classifier 4096; semi 256), divided over the "
                   "processes; a smaller labelled set trains with the largest batch it fills")
    c.add_argument("--bn", choices=("frozen", "train"), default=None, help="semi: train (default, official "
                   "evaluate.py) normalises with the batch statistics and updates the running ones; frozen keeps "
                   "the pretrained statistics throughout (BN weights still train), steadier on tiny label sets: "
                   "on 120 demo photo crops 87.5 vs 84.5 top-1 (train dips to 42.5 on the way), on their 1%% 47.0 "
                   "vs 46.5 (README)")
    c.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    c.add_argument("--cached-features", action="store_true", help="linear: train on centre-crop features "
                   "extracted once (seconds; raise data.batch_size for speed)")
    c.add_argument("--train-percent", type=int, default=None, choices=(1, 10, 100), help="semi: labelled share")
    c.add_argument("--subset-file", default=None, help="semi: SimCLR-style list of training images, one file "
                   "name per line (default: a class-balanced draw, written next to the results)")
    c.add_argument("--seed", type=int, default=0, help="semi: seed of the class-balanced draw")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.path=/data/imagenet")
    return p.parse_intermixed_args(argv)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def check_args(args) -> list[str]:
    """The protocol list; raises ValueError with a one-line reason for bad combinations."""
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"unknown protocol(s) {', '.join(bad) or repr(args.protocols)}; choose from "
                         f"{', '.join(PROTOCOLS)}")
    if len(set(protocols)) != len(protocols):
        raise ValueError(f"protocol listed twice in {args.protocols!r}")
    if "semi" in protocols and args.train_percent is None:
        raise ValueError("semi needs --train-percent 1, 10 or 100")
    if args.batch_size is not None and not {"linear", "semi"} & set(protocols):
        raise ValueError("--batch-size applies to linear and semi only (kNN and cluster extract features with "
                         "data.batch_size)")
    if "semi" not in protocols and (args.train_percent or args.subset_file or args.lr_backbone is not None
                                    or args.bn):
        raise ValueError("--train-percent, --subset-file, --lr-backbone and --bn apply to semi only")
    if args.gallery and "cluster" not in protocols:
        raise ValueError("--gallery applies to cluster only")
    if args.cached_features and "linear" not in protocols:
        raise ValueError("--cached-features applies to linear only")
    from evaluation.baselines import parse_baselines
    parse_baselines(args.baseline)
    ks = (args.ks or "1").split(",")
    if not all(k.strip().isdigit() and int(k) > 0 for k in ks):
        raise ValueError(f"--ks must be positive integers separated by commas, got {args.ks!r}")
    return protocols


def run(args, protocols: list[str], out: Path) -> dict:
    from evaluation import official, protocols as ev
    from evaluation.baselines import applicable, baseline_model, parse_baselines
    from engine.config import load_config, to_dict
    from engine.distributed import init_distributed, shutdown
    from evaluation.features import load_for_eval

    ckpt_path = Path(args.checkpoint)
    base = load_config(args.config) if args.config else None
    try:
        model, cfg, has_head = load_for_eval(ckpt_path, base, args.overrides)
    except RuntimeError as exc:  # unreadable checkpoint, or one that holds more than tensors
        raise ValueError(str(exc)) from None
    if "cluster" in protocols and not has_head:
        raise ValueError("'cluster' needs the trained head; pass a fasttwist checkpoint")
    if "cluster" in protocols:
        try:
            model.check_classifier(args.classifier)
        except ValueError as exc:
            raise ValueError(f"--classifier: {exc}") from None
    protocol = official.select(cfg.method, cfg.model.arch)
    hps = {"linear": lambda: official.linear_hparams(protocol, args.epochs, args.lr_classifier, args.weight_decay,
                                                     args.eval_every, args.batch_size),
           "semi": lambda: official.semi_hparams(args.train_percent, args.epochs, args.lr_classifier,
                                                 args.lr_backbone, args.weight_decay, args.eval_every, args.bn,
                                                 args.batch_size)}
    hparams = {p: hps[p]() for p in protocols if p in hps}   # validate before any work
    info = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min, cfg.train.threads)
    t0 = time.time()
    try:
        ctx = ev.EvalContext(model, cfg, info, has_head, show=info.is_main, classifier_index=args.classifier)
        metrics, details = run_protocols(args, protocols, ctx, hparams, out)
        baseline = {}
        for name in parse_baselines(args.baseline):
            b_model, b_head = baseline_model(name, cfg)
            todo = [p for p in protocols if applicable(name, p, args.cached_features)]
            b_ctx = ev.EvalContext(b_model, cfg, info, b_head, show=info.is_main, classifier_index=args.classifier)
            b_metrics, b_details = run_protocols(args, todo, b_ctx, hparams, None)
            baseline[name] = {"metrics": b_metrics, "protocols": todo,
                              "seconds": round(sum(d["seconds"] for d in b_details.values()), 2)}
    finally:
        shutdown()
    return {"protocol": ",".join(protocols), "method": cfg.method, "classifier": args.classifier,
            "official_protocol": protocol if hparams else None,
            "checkpoint": str(ckpt_path),
            "checkpoint_sha256": file_hash(ckpt_path) if info.is_main else "", "dataset": cfg.data.path,
            "splits": [cfg.data.train_split, cfg.data.val_split], "metrics": metrics, "details": details,
            "baseline": baseline,
            "world_size": info.world_size, "device": str(info.device), "seconds": round(time.time() - t0, 2),
            "config": to_dict(cfg), "is_main": info.is_main}


def write_gallery(ctx, path: str) -> dict:
    """The cluster gallery PNG from the val logits `cluster` just scored; returns what it shows."""
    from pipelines.sources import load_source
    from tools.image_grids import cluster_gallery
    cfg = ctx.cfg
    try:
        files, _ = load_source(cfg.data.path, cfg.data.val_split)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise ValueError(f"--gallery needs the images as files (an image folder or file list), but data.path "
                         f"'{cfg.data.path}' gives: {exc}") from None
    val = ctx.features("val", with_head=True)
    rows = cluster_gallery(val["logits"], val["labels"], [files[i] for i in val["indices"].tolist()], path)
    return {"path": str(path), "rows": rows}


def run_protocols(args, protocols: list[str], ctx, hparams: dict, out: Path | None) -> tuple[dict, dict]:
    """(metrics, details) of each protocol on one model; features are extracted once and shared. The cluster
    gallery is drawn for the checkpoint itself (`out` given), not for baselines."""
    from evaluation import protocols as ev
    metrics, details = {}, {}
    for p in protocols:
        t = time.time()
        if p == "knn":
            ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else None
            m, d = ev.run_knn(ctx, *ev.knn_defaults(ctx.cfg.method, ks, args.temperature))
        elif p == "cluster":
            m, d = ev.run_cluster(ctx, args.surplus_clusters)
        elif p == "linear":
            m, d = ev.run_linear(ctx, hparams[p], args.cached_features)
        else:
            m, d = ev.run_semi(ctx, hparams[p], args.train_percent, args.subset_file, args.seed,
                               out.with_name(f"{out.stem}_subset.txt") if out else None)
        if p == "cluster" and args.gallery and out is not None and ctx.info.is_main:
            d["gallery"] = write_gallery(ctx, args.gallery)
        metrics.update(m)
        details[p] = {**d, "seconds": round(time.time() - t, 2)}   # includes features it extracted first
    return metrics, details


def report(result: dict, out: Path) -> None:
    from rich.table import Table

    from engine.runlog import console
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"fasttwist {result['protocol']}")
    table.add_column("metric")
    table.add_column("checkpoint", justify="right")
    baselines = result.get("baseline", {})
    for name in baselines:
        table.add_column(f"{name} (baseline)", justify="right")
    for k, v in result["metrics"].items():
        fmt = "{:.0f}" if k.endswith(("epoch", "clusters_used")) else "{:.4f}" if k.startswith("cluster") \
            or k.endswith("loss") else "{:.2f}"
        others = [baselines[b]["metrics"].get(k) for b in baselines]
        table.add_row(k, fmt.format(v), *("-" if o is None else fmt.format(o) for o in others))
    console.print(table)
    console.print(f"checkpoint {result['checkpoint']} (sha256 {result['checkpoint_sha256']}), dataset "
                  f"{result['dataset']}, {result['seconds']:.1f} s; results written to {out}")


@entry_point("evaluate.py")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    protocols = check_args(args)
    tags = [p + ("_cached" if p == "linear" and args.cached_features else "") +
            (str(args.train_percent) if p == "semi" else "") for p in protocols]
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"eval_{'_'.join(tags)}.json")
    result = run(args, protocols, out)
    if result.pop("is_main"):
        report(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
