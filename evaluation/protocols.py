"""The evaluation protocols behind evaluate.py. Each returns (metrics, details): metrics are flat, prefixed
with the protocol's tag (`knn_top1_k20`, `cluster_nmi`, `linear_best_top1`, `semi1_top1`); details hold the
resolved hyper-parameters, the per-epoch history and subset information for the results file.

Official settings (TWIST's evaluate.py, after Barlow Twins; learning rates here are per 256 samples of the global
batch): linear — 100 epochs, `--lr-classifier 0.2` at `--batch-size 1024` = 0.05 per 256, wd 0; semi (batch 256) —
classifier lr 0.2, backbone lr 0.04 / 20 epochs (1%), 0.02 / 20 epochs (10%), 0.01 / 30 epochs (100%), wd 0, BN per
process (no SyncBN; here BN keeps its pretrained statistics by default, see `semi_hparams`). kNN: TWIST has no kNN protocol; for TWIST checkpoints the defaults are the common weighted kNN
(k 20 and 200, T 0.07: InstDisc/DINO), for Self-Classifier its knn_eval.py (k 10, 20, 100, 200, T 0.1). Cluster
ACC with more clusters than classes: TWIST counts surplus clusters as wrong, Self-Classifier maps each to its most
frequent label (`cluster_surplus`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import Config
from engine.distributed import DistInfo
from evaluation.features import extract
from evaluation.knn_shards import KnnShards
from evaluation.finetune import Classifier, ClassifierHParams, FeatureBatches, fit_classifier
from evaluation.metrics import cluster_metrics, knn_accuracy
from engine.precision import resolve_precision
from evaluation.subsets import balanced_subset, class_counts, read_subset_file, write_subset_file
from models.multicrop import MultiCropModel
from pipelines import MultiCropSpec, ViewGroup, build_pipeline
from pipelines.sources import load_source

LINEAR = dict(epochs=100, lr_classifier=0.05, lr_backbone=0.0, weight_decay=0.0)
SEMI = dict(lr_classifier=0.2, weight_decay=0.0, bn="frozen")   # bn: the one deliberate difference, see semi_hparams
SEMI_BY_PERCENT = {1: dict(epochs=20, lr_backbone=0.04), 10: dict(epochs=20, lr_backbone=0.02),
                   100: dict(epochs=30, lr_backbone=0.01)}    # the official README commands
KNN = {"twist": dict(ks=(20, 200), temperature=0.07), "self_classifier": dict(ks=(10, 20, 100, 200), temperature=0.1)}
CLUSTER_SURPLUS = {"twist": "wrong", "self_classifier": "best"}
TRAIN_PERCENTS = (1, 10, 100)


def linear_hparams(epochs=None, lr_classifier=None, weight_decay=None, eval_every=1) -> ClassifierHParams:
    """The official linear-protocol settings, with any given value replacing its default."""
    given = dict(epochs=epochs, lr_classifier=lr_classifier, weight_decay=weight_decay)
    return ClassifierHParams(**{**LINEAR, **{k: v for k, v in given.items() if v is not None}},
                             eval_every=eval_every)


def semi_hparams(percent: int, epochs=None, lr_classifier=None, lr_backbone=None, weight_decay=None,
                 eval_every=1, bn=None) -> ClassifierHParams:
    """The official semi-supervised settings for `percent`% of the labels, with any given value replacing
    its default — except BatchNorm, which by default keeps the pretrained running statistics (`bn="frozen"`; the
    official evaluate.py fine-tunes in train mode, `bn="train"`). In train mode the batch statistics of the
    supervised crops differ from the running statistics the network was pretrained with (a small TWIST ResNet-18:
    features ~3.7x larger in squared norm), so the official classifier lr, tuned for 1000 classes, overshoots on
    a small label set, and validation, which uses running statistics updated only a few times per epoch, sees
    other features than the classifier was trained on: loss climbs, val top-1 falls to chance for epochs."""
    if percent not in TRAIN_PERCENTS:
        raise ValueError(f"--train-percent must be one of {', '.join(map(str, TRAIN_PERCENTS))}, got {percent}")
    base = {**SEMI, **SEMI_BY_PERCENT[percent]}
    given = dict(epochs=epochs, lr_classifier=lr_classifier, lr_backbone=lr_backbone, weight_decay=weight_decay,
                 bn=bn)
    hp = ClassifierHParams(**{**base, **{k: v for k, v in given.items() if v is not None}}, eval_every=eval_every)
    if hp.frozen:
        raise ValueError("semi fine-tunes the backbone: --lr-backbone must be > 0 (use 'linear' to freeze it)")
    return hp


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

    @property
    def precision(self):
        return resolve_precision(self.cfg.train.precision, self.info.device)

    def pipeline(self, split: str, train: bool = False, subset: list[int] | None = None):
        spec = supervised_spec(self.cfg) if train else None
        return build_pipeline(self.cfg, split, self.info.rank, self.info.world_size, self.info.device,
                              train=train, spec=spec, subset=subset)

    def features(self, which: str, with_head: bool = False, scope: str = "all") -> dict[str, torch.Tensor]:
        """Centre-crop backbone features (and head logits) of the train or val split, extracted once per scope
        (`evaluation.features.gather_outputs`: all — gathered on every rank; shard — this rank's part)."""
        if self.info.world_size == 1:
            scope = "all"                      # one process: its shard is everything
        for head in (with_head, True):
            if (which, head, scope) in self._cache:
                return self._cache[(which, head, scope)]
        split = self.cfg.data.train_split if which == "train" else self.cfg.data.val_split
        self._cache[(which, with_head, scope)] = extract(
            self.model, self.pipeline(split), self.info.device, with_head, f"{which} features", self.show,
            self.precision, self.classifier_index, scope)
        return self._cache[(which, with_head, scope)]

    def num_classes(self) -> int:
        _, labels = load_source(self.cfg.data.path, self.cfg.data.train_split)
        return max(labels) + 1

    def classifier(self, frozen: bool, frozen_bn: bool = False) -> Classifier:
        """A fresh linear classifier on a copy of the backbone (fine-tuning must not touch the shared model)."""
        torch.manual_seed(self.cfg.train.seed)
        return Classifier(copy.deepcopy(self.model.backbone), self.model.feature_dim, self.num_classes(), frozen,
                          frozen_bn)


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
    """Frozen backbone + linear classifier. `cached`: centre-crop features extracted once, classifier trained
    on them alone (no augmentation; the quick check)."""
    cfg, info = ctx.cfg, ctx.info
    if cached:
        train, val = ctx.features("train"), ctx.features("val", ctx.has_head)
        train_b = FeatureBatches(train["features"], train["labels"], cfg.data.batch_size, info.rank,
                                 info.world_size, shuffle=True, seed=cfg.train.seed)
        val_b = FeatureBatches(val["features"], val["labels"], cfg.data.batch_size, info.rank, info.world_size)
        torch.manual_seed(cfg.train.seed)
        model = Classifier(torch.nn.Identity(), ctx.model.feature_dim, ctx.num_classes(), frozen=True)
        tag = "linear_cached"
    else:
        train_b, val_b = ctx.pipeline(cfg.data.train_split, train=True), ctx.pipeline(cfg.data.val_split)
        model, tag = ctx.classifier(frozen=True), "linear"
    summary, rows = fit_classifier(model, train_b, val_b, hp, cfg, info, tag, ctx.show)
    return _prefixed(tag, summary), {"hparams": hp.to_dict(), "cached_features": cached, "history": rows,
                                     "global_batch": cfg.data.batch_size * info.world_size}


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
    train_b = ctx.pipeline(cfg.data.train_split, train=True, subset=subset)
    val_b = ctx.pipeline(cfg.data.val_split)
    tag = f"semi{percent}"
    model = ctx.classifier(frozen=False, frozen_bn=hp.bn == "frozen")
    summary, rows = fit_classifier(model, train_b, val_b, hp, cfg, ctx.info, tag, ctx.show)
    return _prefixed(tag, summary), {"hparams": hp.to_dict(), "train_percent": percent, **info, "history": rows,
                                     "global_batch": cfg.data.batch_size * ctx.info.world_size}
