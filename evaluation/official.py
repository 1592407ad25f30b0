"""The official linear and semi-supervised evaluation protocols, one per kind of checkpoint, as the official scripts
run them, and the hyper-parameters evaluate.py builds from them (any value given on the command line replaces its
default). Learning rates are per 256 samples of the global batch and scale linearly with it; the official absolute
values appear converted at the official global batch (`Linear.official_lr`).

Which protocol (`select`) follows the official scripts: TWIST ResNets -> TWIST evaluate.py; TWIST ViT-S / ViT-B ->
TWIST evaluate_vitlinear.py with the README's lr for each; Self-Classifier -> its scripts/lincls_eval.sh.
Semi-supervised: the TWIST README commands (ResNet-50; neither TWIST's ViTs nor Self-Classifier have one, so they
use the same). Every protocol: cosine to 0 per EPOCH (lr constant within an epoch: CosineAnnealingLR stepped once
an epoch, or Self-Classifier's adjust_learning_rate), momentum 0.9, weight decay 0.

Documented differences: ViT crops are resized bilinearly here (evaluate_vitlinear.py: bicubic, interpolation=3;
the project's pipelines resize bilinearly on every backend, engine/config_schema.py); the official TWIST
evaluate.py validates on rank 0 alone, here the ranks share validation (same result).
"""
from __future__ import annotations

from dataclasses import dataclass

from evaluation.finetune import ClassifierHParams
from methods.schedule import cosine

TRAIN_PERCENTS = (1, 10, 100)


@dataclass(frozen=True)
class Linear:
    epochs: int
    lr: float                 # per 256 samples of the global batch
    global_batch: int
    optimizer: str            # sgd | larc (apex LARC, trust 0.001, clip False, around SGD)
    n_last_blocks: int        # ViT: CLS tokens of the last n blocks concatenated; 1: the backbone's output
    source: str

    @property
    def official_lr(self) -> float:
        """The absolute lr of the official run (at its global batch)."""
        return self.lr * self.global_batch / 256


@dataclass(frozen=True)
class Protocol:
    name: str
    linear: Linear


# TWIST evaluate.py does not scale --lr-classifier with the batch: 0.2 at --batch-size 1024 is 0.05 per 256.
# evaluate_vitlinear.py scales --lr by batch_size_per_gpu (128) x 8 GPUs / 256. Self-Classifier: -b 1024 is per
# node (lincls_eval.py divides it by the node's 4 GPUs) on 4 nodes = 4096, --lr 0.8 unscaled = 0.05 per 256.
PROTOCOLS = {
    "twist_resnet": Protocol("TWIST ResNet", Linear(
        100, 0.05, 1024, "sgd", 1, "TWIST evaluate.py, README 'Linear Classification' (--batch-size 1024 "
        "--lr-classifier 0.2 --weight-decay 0)")),
    "twist_vit_small": Protocol("TWIST ViT-S", Linear(
        100, 0.02, 1024, "sgd", 4, "TWIST evaluate_vitlinear.py (--n_last_blocks 4, --avgpool_patchtokens "
        "false, 128/GPU x 8), README 'For DeiT-S' --lr 0.02")),
    "twist_vit_base": Protocol("TWIST ViT-B", Linear(
        100, 0.0015, 1024, "sgd", 4, "TWIST evaluate_vitlinear.py (--n_last_blocks 4, --avgpool_patchtokens "
        "false, 128/GPU x 8), README 'For ViT-B' --lr 0.0015")),
    "self_classifier": Protocol("Self-Classifier", Linear(
        100, 0.05, 4096, "larc", 1, "Self-Classifier scripts/lincls_eval.sh + src/lincls_eval.py (-b 1024 per "
        "node x 4 nodes, --lr 0.8 --lars --sgd --cos --wd 0)")),
}
SEMI = dict(lr_classifier=0.2, global_batch=256, weight_decay=0.0, bn="train", optimizer="sgd")
SEMI_BY_PERCENT = {1: dict(epochs=20, lr_backbone=0.04), 10: dict(epochs=20, lr_backbone=0.02),
                   100: dict(epochs=30, lr_backbone=0.01)}
SEMI_SOURCE = "TWIST evaluate.py, README 'Semi-supervised Learning' (--weights finetune, batch 256, BN per process)"
LARC_TRUST = 0.001           # lincls_eval.py: LARC(optimizer, trust_coefficient=0.001, clip=False)


def select(method: str, arch: str) -> str:
    """The official protocol for a checkpoint of `method` and `arch`."""
    if method == "self_classifier":
        return "self_classifier"
    return {"vit_small": "twist_vit_small", "vit_base": "twist_vit_base"}.get(arch, "twist_resnet")


def linear_hparams(protocol: str = "twist_resnet", epochs=None, lr_classifier=None, weight_decay=None,
                   eval_every=1, batch_size=None) -> ClassifierHParams:
    """The official linear-protocol settings of `protocol`, with any given value replacing its default."""
    lin = PROTOCOLS[protocol].linear
    base = dict(epochs=lin.epochs, lr_classifier=lin.lr, global_batch=lin.global_batch, optimizer=lin.optimizer,
                n_last_blocks=lin.n_last_blocks)
    given = dict(epochs=epochs, lr_classifier=lr_classifier, weight_decay=weight_decay, global_batch=batch_size)
    return ClassifierHParams(**{**base, **{k: v for k, v in given.items() if v is not None}}, eval_every=eval_every)


def semi_hparams(percent: int, epochs=None, lr_classifier=None, lr_backbone=None, weight_decay=None,
                 eval_every=1, bn=None, batch_size=None) -> ClassifierHParams:
    """The official semi-supervised settings for `percent`% of the labels, with any given value replacing its
    default. BatchNorm: `train` (official: batch statistics, running ones updated) or `frozen` (the pretrained
    running statistics throughout, as at validation). On a tiny label set train mode is less steady: the batch
    statistics of a few supervised crops differ from the running statistics the network was pretrained with, and
    validation, which uses running statistics updated a few times per epoch, sees other features than the
    classifier was trained on (README's evaluation table has the measured difference on the demo photo crops)."""
    if percent not in TRAIN_PERCENTS:
        raise ValueError(f"--train-percent must be one of {', '.join(map(str, TRAIN_PERCENTS))}, got {percent}")
    base = {**SEMI, **SEMI_BY_PERCENT[percent]}
    given = dict(epochs=epochs, lr_classifier=lr_classifier, lr_backbone=lr_backbone, weight_decay=weight_decay,
                 bn=bn, global_batch=batch_size)
    hp = ClassifierHParams(**{**base, **{k: v for k, v in given.items() if v is not None}}, eval_every=eval_every)
    if hp.frozen:
        raise ValueError("semi fine-tunes the backbone: --lr-backbone must be > 0 (use 'linear' to freeze it)")
    return hp


def epoch_lr(peak: float, epoch: int, epochs: int) -> float:
    """The lr of every step of `epoch` (0-based): cosine from `peak` to 0 over the epochs, as torch's
    CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once an epoch and Self-Classifier's adjust_learning_rate."""
    return cosine(epoch, epochs, peak, 0.0)


def fit_batch(global_batch: int, samples: int, world: int) -> tuple[int, str | None]:
    """(per-process batch, note): the global batch divided over the processes (floored, as the official
    `batch_size // world_size`); a labelled set smaller than one global batch trains with the largest batch that
    fits it, and `note` says so in one line."""
    if global_batch < world:
        raise ValueError(f"--batch-size {global_batch} is smaller than the {world} processes; give each at least one")
    if samples < world:
        raise ValueError(f"{samples} training samples cannot give each of {world} processes one; use fewer "
                         f"processes or more labels")
    if samples >= global_batch:
        return global_batch // world, None
    per = samples // world
    return per, (f"{samples} training samples are fewer than the global batch {global_batch}: training with batch "
                 f"{per * world} ({per} per process), the learning rates scaled to it")


def describe() -> str:
    """The protocols' official values, one line each, with the files they come from (evaluate.py --help)."""
    lines = []
    for key, p in PROTOCOLS.items():
        lin = p.linear
        feats = f"CLS of last {lin.n_last_blocks} blocks" if lin.n_last_blocks > 1 else "backbone output"
        opt = "LARC+SGD" if lin.optimizer == "larc" else "SGD"
        lines.append(f"  {key:16s} linear: {lin.epochs} ep, {opt}, lr {lin.lr:g}/256 ({lin.official_lr:g} at "
                     f"batch {lin.global_batch}), {feats}; {lin.source}")
    semi = ", ".join(f"{p}%: {v['epochs']} ep, backbone lr {v['lr_backbone']:g}" for p, v in SEMI_BY_PERCENT.items())
    lines.append(f"  semi (all)       batch {SEMI['global_batch']}, classifier lr {SEMI['lr_classifier']:g}, {semi}, "
                 f"BN train; {SEMI_SOURCE}")
    return "\n".join(lines)
