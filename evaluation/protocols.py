"""The evaluation protocols behind evaluate.py. Each returns (metrics, details): metrics are flat, prefixed
with the protocol's tag (`knn_top1_k20`, `cluster_nmi`, `linear_best_top1`, `semi1_top1`); details hold the
resolved hyper-parameters, the per-epoch history and subset information for the results file.

linear and semi follow the official protocol of the checkpoint's method and architecture (`evaluation.official`:
values, sources, global batch, schedule). kNN: TWIST has no kNN protocol; for TWIST checkpoints the defaults are
the common weighted kNN (k 20 and 200, T 0.07: InstDisc/DINO), for Self-Classifier its knn_eval.py (k 10, 20,
100, 200, T 0.1). Cluster ACC with more clusters than classes: TWIST counts surplus clusters as wrong,
Self-Classifier maps each to its most frequent label (`cluster_surplus`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.config import Config
from engine.distributed import DistInfo
from evaluation.features import extract, linear_features
from evaluation.knn_shards import KnnShards
from evaluation.finetune import Classifier, ClassifierHParams, FeatureBatches, fit_classifier
from evaluation.official import fit_batch
from evaluation.metrics import cluster_metrics, knn_accuracy
from engine.precision import resolve_precision
from evaluation.subsets import balanced_subset, class_counts, read_subset_file, write_subset_file
from models.multicrop import MultiCropModel
from pipelines import MultiCropSpec, ViewGroup, build_pipeline
from pipelines.sources import load_source

KNN = {"twist": dict(ks=(20, 200), temperature=0.07), "self_classifier": dict(ks=(10, 20, 100, 200), temperature=0.1)}
CLUSTER_SURPLUS = {"twist": "wrong", "self_classifier": "best"}


def supervised_spec(cfg) -> MultiCropSpec:
    """Training view of the supervised protocols: RandomResizedCrop(eval.crop, scale 0.08-1) + flip, no
    colour/blur/solarize, normalised like the evaluation view."""
    aug = cfg.augment
    view = ViewGroup(count=1, size=cfg.eval.crop, scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.0, gray_p=0.0,
                     blur_p=0.0, solarize_p=0.0)
    return MultiCropSpec(groups=(view,), mean=tuple(aug.mean), std=tuple(aug.std))


@dataclass
class EvalContext:
    """What the protocols share: the model, config, process info, and features extracted once."""
    model: MultiCropModel
    cfg: Config
    info: DistInfo
    has_head: bool
    show: bool = True
    classifier_index: int = 0       # which head classifier `cluster` scores (Self-Classifier has several)
    _cache: dict = field(default_factory=dict)

    def say(self, line: str) -> None:
        if self.show:
            print(line, flush=True)

    @property
    def precision(self):
        return resolve_precision(self.cfg.train.precision, self.info.device)

    def pipeline(self, split: str, train: bool = False, subset: list[int] | None = None,
                 batch_size: int | None = None):
        """`batch_size`: per process, and the last partial batch kept (the official loaders' default); else the
        config's."""
        spec = supervised_spec(self.cfg) if train else None
        cfg = self.cfg if batch_size is None else \
            replace(self.cfg, data=replace(self.cfg.data, batch_size=batch_size, drop_last=False))
        return build_pipeline(cfg, split, self.info.rank, self.info.world_size, self.info.device,
                              train=train, spec=spec, subset=subset)

    def train_batch(self, hp: ClassifierHParams, samples: int, tag: str) -> tuple[int, int]:
        """(per-process batch, global batch) for `samples` training images: the protocol's global batch divided
        over the processes, or the largest that fits a smaller set (said in one line)."""
        per, note = fit_batch(hp.global_batch, samples, self.info.world_size)
        if note:
            self.say(f"{tag}: {note}")
        return per, per * self.info.world_size

    def features(self, which: str, with_head: bool = False, scope: str = "all",
                 n_last_blocks: int = 1) -> dict[str, torch.Tensor]:
        """Centre-crop backbone features (and head logits) of the train or val split, extracted once per scope
        (`evaluation.features.gather_outputs`: all — gathered on every rank; shard — this rank's part);
        `n_last_blocks` > 1: a ViT's last blocks' CLS tokens (no head)."""
        if self.info.world_size == 1:
            scope = "all"                      # one process: its shard is everything
        for head in (with_head, True):
            if (which, head, scope, n_last_blocks) in self._cache:
                return self._cache[(which, head, scope, n_last_blocks)]
        split = self.cfg.data.train_split if which == "train" else self.cfg.data.val_split
        self._cache[(which, with_head, scope, n_last_blocks)] = extract(
            self.model, self.pipeline(split), self.info.device, with_head, f"{which} features", self.show,
            self.precision, self.classifier_index, scope, n_last_blocks)
        return self._cache[(which, with_head, scope, n_last_blocks)]

    def num_classes(self) -> int:
        _, labels = load_source(self.cfg.data.path, self.cfg.data.train_split)
        return max(labels) + 1

    def classifier(self, frozen: bool, frozen_bn: bool = False, n_last_blocks: int = 1) -> Classifier:
        """A fresh linear classifier on a copy of the backbone (fine-tuning must not touch the shared model)."""
        net, dim = linear_features(copy.deepcopy(self.model.backbone), self.model.feature_dim, n_last_blocks)
        torch.manual_seed(self.cfg.train.seed)
        return Classifier(net, dim, self.num_classes(), frozen, frozen_bn)


def knn_defaults(method: str, ks=None, temperature=None) -> tuple[tuple[int, ...], float]:
    """The kNN settings of `method`'s official evaluation (see the module doc), any given value replacing them."""
    d = KNN.get(method, KNN["twist"])
    return tuple(ks or d["ks"]), d["temperature"] if temperature is None else temperature


def run_knn(ctx: EvalContext, ks=(20, 200), temperature: float = 0.07) -> tuple[dict, dict]:
    """Under torchrun the train bank stays split across ranks (each holds its share) and the ranks merge their
    nearest neighbours (`evaluation.knn_shards`); every rank gets the whole bank's result."""
    shards = KnnShards() if ctx.info.distributed else None
    train = ctx.features("train", scope="shard" if shards else "all")
    val = ctx.features("val", ctx.has_head)
    metrics = knn_accuracy(train["features"], train["labels"], val["features"], val["labels"], ks=ks,
                           temperature=temperature, shards=shards)
    bank = shards.total(int(train["labels"].numel())) if shards else int(train["labels"].numel())
    return metrics, {"ks": list(ks), "temperature": temperature, "bank_size": bank,
                     "bank_per_rank_max": shards.max(int(train["labels"].numel())) if shards else bank}


def run_cluster(ctx: EvalContext, surplus: str | None = None) -> tuple[dict, dict]:
    """`surplus`: how ACC scores clusters beyond the number of classes (default: the method's official way)."""
    if not ctx.has_head:
        raise ValueError("'cluster' needs the trained head; pass a fasttwist checkpoint")
    surplus = surplus or CLUSTER_SURPLUS.get(ctx.cfg.method, "wrong")
    val = ctx.features("val", with_head=True)
    pred = val["logits"].argmax(dim=1)
    return ({f"cluster_{k}": v for k, v in cluster_metrics(pred, val["labels"], surplus).items()},
            {"num_heads": int(val["logits"].shape[1]), "surplus_clusters": surplus})


def _prefixed(tag: str, summary: dict) -> dict:
    return {f"{tag}_{k}": v for k, v in summary.items()}


def run_linear(ctx: EvalContext, hp: ClassifierHParams, cached: bool = False) -> tuple[dict, dict]:
    """Frozen backbone + linear classifier, at the protocol's global batch. `cached`: centre-crop features
    extracted once, classifier trained on them alone (no augmentation; the quick check, at data.batch_size x
    processes, not an official protocol)."""
    cfg, info = ctx.cfg, ctx.info
    n = hp.n_last_blocks
    if cached:
        train, val = ctx.features("train", n_last_blocks=n), ctx.features("val", ctx.has_head and n == 1,
                                                                         n_last_blocks=n)
        train_b = FeatureBatches(train["features"], train["labels"], cfg.data.batch_size, info.rank,
                                 info.world_size, shuffle=True, seed=cfg.train.seed)
        val_b = FeatureBatches(val["features"], val["labels"], cfg.data.batch_size, info.rank, info.world_size)
        torch.manual_seed(cfg.train.seed)
        model = Classifier(torch.nn.Identity(), train["features"].shape[1], ctx.num_classes(), frozen=True)
        tag, global_batch = "linear_cached", cfg.data.batch_size * info.world_size
    else:
        tag = "linear"
        per, global_batch = ctx.train_batch(hp, len(load_source(cfg.data.path, cfg.data.train_split)[0]), tag)
        train_b, val_b = ctx.pipeline(cfg.data.train_split, True, batch_size=per), ctx.pipeline(cfg.data.val_split)
        model = ctx.classifier(frozen=True, n_last_blocks=n)
    summary, rows = fit_classifier(model, train_b, val_b, hp, cfg, info, tag, ctx.show, global_batch)
    return _prefixed(tag, summary), {"hparams": hp.to_dict(), "cached_features": cached, "history": rows,
                                     "global_batch": global_batch, "feature_dim": model.fc.in_features}


def semi_subset(ctx: EvalContext, percent: int, subset_file: str | None, seed: int,
                write_to: Path | None) -> tuple[list[int] | None, dict]:
    """The labelled training images: a subset file, a seeded class-balanced draw (written to `write_to`),
    or everything at 100%."""
    files, labels = load_source(ctx.cfg.data.path, ctx.cfg.data.train_split)
    if subset_file:
        subset, source = read_subset_file(subset_file, files), str(subset_file)
    elif percent == 100:
        return None, {"subset": "all", "subset_size": len(files)}
    else:
        subset = balanced_subset(labels, percent, seed)
        source = f"class-balanced draw, seed {seed}"
        if write_to is not None and ctx.info.is_main:
            write_subset_file(write_to, files, subset)
            source += f", written to {write_to}"
    counts = class_counts(labels, subset)
    return subset, {"subset": source, "subset_size": len(subset), "subset_seed": None if subset_file else seed,
                    "subset_per_class": [min(counts.values()), max(counts.values())],
                    "subset_classes": len(counts)}


def run_semi(ctx: EvalContext, hp: ClassifierHParams, percent: int, subset_file: str | None = None,
             seed: int = 0, write_subset_to: Path | None = None) -> tuple[dict, dict]:
    """Fine-tune backbone + linear classifier on `percent`% of the training labels."""
    cfg = ctx.cfg
    subset, info = semi_subset(ctx, percent, subset_file, seed, write_subset_to)
    tag = f"semi{percent}"
    per, global_batch = ctx.train_batch(hp, info["subset_size"], tag)
    train_b = ctx.pipeline(cfg.data.train_split, train=True, subset=subset, batch_size=per)
    val_b = ctx.pipeline(cfg.data.val_split)
    model = ctx.classifier(frozen=False, frozen_bn=hp.bn == "frozen")
    summary, rows = fit_classifier(model, train_b, val_b, hp, cfg, ctx.info, tag, ctx.show, global_batch)
    return _prefixed(tag, summary), {"hparams": hp.to_dict(), "train_percent": percent, **info, "history": rows,
                                     "global_batch": global_batch}
