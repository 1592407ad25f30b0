"""A linear classifier on a pretrained backbone, trained with SGD momentum (or apex-LARC around it) and a cosine
per epoch — one loop for the linear
protocol (frozen backbone), the semi-supervised protocol (backbone fine-tuned) and the cached-features probe
(the classifier alone on features extracted once).

The loop takes anything shaped like a pipeline (`set_epoch`, `len`, iterating `Batch`es): the image pipelines
for linear/semi, `FeatureBatches` for cached features. Under torchrun the classifier is wrapped in DDP and each
rank trains on its shard; validation is gathered from all ranks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import checkpoint as ckpt
from engine.distributed import DistInfo, all_reduce_mean
from engine.optim import LARS
from evaluation.features import gather_outputs
from engine.runlog import progress
from evaluation.metrics import topk_accuracy
from engine.precision import autocast, resolve_precision, scaled_backward, scaled_step
from engine.step import prepare_model
from pipelines import Batch
from pipelines.order import EpochSampler


@dataclass
class ClassifierHParams:
    epochs: int
    lr_classifier: float          # per 256 samples of the global batch (scaled linearly with it)
    lr_backbone: float = 0.0      # per 256 samples; 0 freezes the backbone (linear protocol)
    weight_decay: float = 0.0
    momentum: float = 0.9
    eval_every: int = 1           # validate every N epochs and after the last one
    sync_bn: bool = False         # fine-tuning: SyncBatchNorm across ranks (official: per-process BN)
    bn: str = "train"             # fine-tuning: train (BatchNorm normalises with batch statistics and updates its
                                  # running ones: the official evaluate.py) | frozen (the pretrained running
                                  # statistics throughout, as at validation; BN affine parameters still train)
    global_batch: int = 256       # images per step over all processes (capped by the training set's size)
    optimizer: str = "sgd"        # sgd | larc (apex LARC around SGD, trust 0.001, clip False: Self-Classifier)
    n_last_blocks: int = 1        # ViT linear: CLS tokens of the last n blocks concatenated (evaluate_vitlinear.py)

    def __post_init__(self):
        if self.epochs <= 0 or self.eval_every <= 0:
            raise ValueError(f"epochs and eval-every must be > 0, got {self.epochs} and {self.eval_every}")
        if self.lr_classifier <= 0 or self.lr_backbone < 0 or self.weight_decay < 0:
            raise ValueError("learning rates must be > 0 (backbone >= 0) and weight decay >= 0")
        if self.bn not in ("train", "frozen"):
            raise ValueError(f"--bn must be 'train' or 'frozen', got {self.bn!r}")
        if self.global_batch <= 0:
            raise ValueError(f"--batch-size must be > 0, got {self.global_batch}")
        if self.optimizer not in ("sgd", "larc") or self.n_last_blocks < 1:
            raise ValueError(f"optimizer must be sgd or larc and n_last_blocks >= 1, got {self.optimizer!r}, "
                             f"{self.n_last_blocks}")

    @property
    def frozen(self) -> bool:
        return self.lr_backbone == 0

    def to_dict(self) -> dict:
        return asdict(self)


def new_linear(in_dim: int, num_classes: int) -> nn.Linear:
    """The official initialisation: weights N(0, 0.01), bias 0."""
    fc = nn.Linear(in_dim, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


class Classifier(nn.Module):
    """backbone -> Linear(feature_dim, num_classes). A frozen backbone stays in eval mode (BatchNorm uses its
    pretrained statistics) and runs without autograd, whatever `train()` is called with; `frozen_bn` keeps only
    the backbone's BatchNorm layers in eval mode while the rest fine-tunes."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, frozen: bool,
                 frozen_bn: bool = False):
        super().__init__()
        self.backbone, self.frozen, self.frozen_bn = backbone, frozen, frozen_bn
        self.fc = new_linear(feature_dim, num_classes)
        if frozen:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        elif self.frozen_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                f = self.backbone(x)
        else:
            f = self.backbone(x)
        return self.fc(f)


class EpochCosine:
    """SGD with momentum, or apex LARC around it (`hp.optimizer="larc"`: Self-Classifier's lincls_eval.py; the
    project's LARS in its LARC mode, every tensor adapted); one param group per (params, lr per 256); each lr
    scaled by global_batch / 256 and annealed by a cosine to 0 per epoch (`set_epoch`: constant within it)."""

    def __init__(self, groups: list[tuple[list, float]], hp: ClassifierHParams, global_batch: int):
        from evaluation.official import LARC_TRUST, epoch_lr
        self.peaks = [lr * global_batch / 256.0 for _, lr in groups]
        self.epochs, self._epoch_lr = hp.epochs, epoch_lr
        params = [dict(params=list(p), weight_decay=hp.weight_decay) for p, _ in groups]
        if hp.optimizer == "larc":
            self.opt = LARS(params, lr=0.0, momentum=hp.momentum, eta=LARC_TRUST, lr_in_momentum=False)
        else:
            self.opt = torch.optim.SGD(params, lr=0.0, momentum=hp.momentum)

    def lrs(self, epoch: int) -> list[float]:
        return [self._epoch_lr(peak, epoch, self.epochs) for peak in self.peaks]

    def set_epoch(self, epoch: int) -> None:
        for g, lr in zip(self.opt.param_groups, self.lrs(epoch)):
            g["lr"] = lr

    def step(self, loss: torch.Tensor, scaler=None) -> None:
        self.opt.zero_grad(set_to_none=True)
        scaled_backward(loss, scaler)
        scaled_step(self.opt, scaler)


class History:
    """Validation results per evaluated epoch; the summary has final and best top-1/top-5."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, epoch: int, loss: float, acc: dict) -> None:
        self.rows.append({"epoch": epoch, "train_loss": loss, **acc})

    def summary(self) -> dict:
        last = self.rows[-1]
        best = max(self.rows, key=lambda r: r["top1"])
        return {"top1": last["top1"], "top5": last["top5"], "best_top1": best["top1"],
                "best_top5": max(r["top5"] for r in self.rows), "best_epoch": best["epoch"],
                "train_loss": last["train_loss"]}


class FeatureBatches:
    """Cached features served like a pipeline: this rank's shard in mini-batches, reshuffled every epoch from
    (seed, epoch) when `shuffle`; padded across ranks like the image pipelines (`indices` de-duplicate)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int = 0,
                 world: int = 1, shuffle: bool = False, seed: int = 0, drop_last: bool = False):
        self.x, self.y, self.batch_size, self.drop_last = features, labels, batch_size, drop_last
        self.sampler = EpochSampler(features.shape[0], rank, world, shuffle=shuffle, seed=seed)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = self.sampler.per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        idx = torch.tensor(self.sampler.indices(), dtype=torch.long, device=self.x.device)
        for i in range(len(self)):
            b = idx[i * self.batch_size:(i + 1) * self.batch_size]
            yield Batch([self.x[b]], self.y[b], b)


@torch.no_grad()
def validate(model: nn.Module, val_batches, precision, device: torch.device) -> dict:
    """top-1/top-5 (%) over the whole validation set, gathered from all ranks."""
    model.eval()

    def fn(x):
        with autocast(precision, device):
            return {"logits": model(x)}

    out = gather_outputs(val_batches, fn, "val", show=False)
    return topk_accuracy(out["logits"], out["labels"], ks=(1, 5))


def finetune_model_config(cfg, hp: ClassifierHParams):
    """The model settings fine-tuning runs with: BN per process unless `hp.sync_bn` (the official evaluate.py
    fine-tunes a plain torchvision ResNet under DDP, without SyncBN)."""
    return replace(cfg.model, sync_bn=hp.sync_bn, sync_bn_group=0)


def fit_classifier(model: Classifier, train_batches, val_batches, hp: ClassifierHParams, cfg, info: DistInfo,
                   desc: str = "linear", show: bool = True, global_batch: int | None = None) -> tuple[dict, list[dict]]:
    """Train `model` (frozen backbone when hp.frozen) and validate; returns (summary, per-epoch rows).
    `global_batch`: the images per step over all processes that the learning rates scale with (default
    data.batch_size x processes)."""
    device = info.device
    steps = len(train_batches)
    if steps <= 0:
        raise ValueError(f"{desc}: fewer training samples per process than one batch; lower the batch size")
    precision = resolve_precision(cfg.train.precision, device)
    net = prepare_model(model, cfg.train, finetune_model_config(cfg, hp), device, info.distributed)
    plain = ckpt.unwrap(net)
    groups = [(plain.fc.parameters(), hp.lr_classifier)]
    if not hp.frozen:
        groups.append((plain.backbone.parameters(), hp.lr_backbone))
    opt = EpochCosine(groups, hp, global_batch or cfg.data.batch_size * info.world_size)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    history = History()
    with progress(show) as bar:
        task = bar.add_task(desc, total=hp.epochs * steps, info="")
        for epoch in range(hp.epochs):
            train_batches.set_epoch(epoch)
            opt.set_epoch(epoch)
            net.train()
            loss_sum = torch.zeros((), device=device)
            for batch in train_batches:
                with autocast(precision, device):
                    logits = net(batch.views[0])
                loss = F.cross_entropy(logits.float(), batch.labels)
                opt.step(loss, scaler)
                loss_sum += loss.detach()
                bar.advance(task)
            if (epoch + 1) % hp.eval_every == 0 or epoch + 1 == hp.epochs:
                acc = validate(plain, val_batches, precision, device)
                history.add(epoch + 1, float(all_reduce_mean(loss_sum / steps)), {**acc, "lr": opt.lrs(epoch)[0]})
                bar.update(task, info=f"epoch {epoch + 1} loss {history.rows[-1]['train_loss']:.3f} "
                                      f"top1 {acc['top1']:.2f}")
    return history.summary(), history.rows
