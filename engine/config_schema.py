"""The configuration's schema: one dataclass per concern, each field documented beside it with its range rule
(`checked(default, RULE)`), the allowed values (derived from the registries) and the cross-field checks.
engine/config.py reads recipes and overrides into it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

from methods.registry import METHODS
from models.backbones import ARCHS
from pipelines import BACKENDS
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the fix."""


class Rule(NamedTuple):
    """A range rule on one field: `ok(value)` says whether it holds, `says` is the error's wording. Tuple fields
    take rules on their items (`each`); `bad` is an item that breaks the rule (the schema's tests use it)."""
    ok: Callable[[Any], bool]
    says: str
    bad: Any
    each: bool = False


POSITIVE = Rule(lambda v: v > 0, "must be > 0", 0)
NON_NEGATIVE = Rule(lambda v: v >= 0, "must be >= 0", -1)
OFF_AT_ZERO = Rule(lambda v: v >= 0, "must be >= 0 (0 turns it off)", -1)
UNIT = Rule(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]", 1.5)
SIZES = Rule(lambda v: v > 0, "sizes must be > 0", 0, each=True)
PROBABILITIES = Rule(lambda v: 0.0 <= v <= 1.0, "probabilities must be in [0, 1]", 1.5, each=True)
PROBABILITY = Rule(lambda v: 0.0 <= v <= 1.0, "must be a probability in [0, 1]", 2)
STRENGTHS = Rule(lambda v: v >= 0, "strengths must be >= 0 (0 turns one off)", -0.1, each=True)
SPREADS = Rule(lambda v: v > 0, "standard deviations must be > 0", 0, each=True)
# A RandomResizedCrop area range, [min, max] of the image's area (the pipelines' ViewGroup check, stated here so
# that the error names the config key instead of a traceback from deep in a pipeline).
AREA_RANGE = Rule(lambda v: 0 < v[0] <= v[1] <= 1, "must be [min, max] with 0 < min <= max <= 1", [1.0, 0.4])


def checked(default, rule: Rule):
    """A dataclass field with a default and a range rule that validate() applies."""
    return field(default=default, metadata={"check": rule})


def ruled_fields(obj, prefix: str = "") -> Iterator[tuple[str, Rule, Any]]:
    """(dotted key, rule, value) of every field with a range rule, nested sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from ruled_fields(value, f"{prefix}{f.name}.")
        elif "check" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["check"], value


@dataclass
class DaliConfig:
    """`data.backend=dali` (pipelines/dali_backend.py)."""
    threads: int = checked(2, POSITIVE)  # CPU threads per pipeline (reading, Huffman decoding of what the
                                    # hardware decoder does not take); 2 suffice with hw_decoder_load ~0.95
    hw_decoder_load: float = 0.95  # on the GPU: share of JPEGs sent to the hardware JPEG engines
                                    # (A100/H100/H200); the rest is Huffman-decoded on the CPU threads. DALI's own
                                    # default 0.65 needs ~4 busy threads; tune in 0.9-0.99 with tools/profiler.py
    preallocate: tuple[int, int] = (0, 0)  # on the GPU: width, height hint to preallocate the
                                    # hardware decoder's memory (the dataset's largest image; 0 0: no hint)
    memory_padding: tuple[int, int] = (211025920, 140544512)  # on the GPU: nvJPEG's device and
                                    # host buffer padding per thread, bytes (DALI's ImageNet values: no reallocation
                                    # mid-run); lower both for small, pre-resized images to save GPU memory
    prefetch: int = checked(2, POSITIVE)  # batches the pipeline runs ahead (each costs one batch of views)
    decode: str = "full"       # full (decode once, crop every view: best for multi-crop) |
                                    # fused (decode only each view's window, once per view: for 1-2 views)
    shuffle_buffer: int = 4096  # on tar shards: samples in the reader's shuffle buffer
    check_threads: int = checked(1, OFF_AT_ZERO)  # image folders: threads checking every file at start-up
                                    # (pipelines/filecheck.py; DALI stops on an unreadable file). 1 is fastest on
                                    # a local disk (5-8 s for 1.28M files: BENCHMARKS.md); more hide a network file
                                    # system's latency; 0 skips the check (only for a folder known to be clean)


@dataclass
class FFCVConfig:
    """`data.backend=ffcv` (pipelines/ffcv_backend.py)."""
    os_cache: bool = True      # read the .beton through the OS page cache (best when it fits in RAM);
                                    # false: FFCV's own page cache, for datasets larger than memory


@dataclass
class DataConfig:
    backend: str = "torch"          # torch | dali | ffcv — which pipeline feeds the GPU; pil = CPU baseline
    path: str = "data/demo"         # ImageNet-layout root with train/ and val/ (or a converted dataset)
    train_split: str = "train"      # split folder (or SPLIT.txt list) trained on, under data.path
    val_split: str = "val"          # split evaluated and monitored: ImageNet's val/ (flat + LOC_val_solution.csv
                                    # or class folders), a converted val set, or SPLIT.txt
    batch_size: int = checked(64, POSITIVE)  # per process (per GPU); the global batch is batch_size x world_size
    workers: int = checked(2, NON_NEGATIVE)  # reader processes per GPU (torch, pil); with GPU augmentation
                                    # 2-4 are plenty
    augment_device: str = "auto"    # auto | cpu | cuda — where the multi-crop engine runs
    decode_device: str = "auto"     # auto | cpu | cuda — cuda: workers only read bytes, nvJPEG decodes in batches
    drop_last: bool = True          # drop each epoch's short last batch (equal steps on every rank; BN sees full
                                    # batches); false keeps it as a smaller batch
    dali: DaliConfig = field(default_factory=DaliConfig)   # data.dali.*: the dali backend's settings
    ffcv: FFCVConfig = field(default_factory=FFCVConfig)   # data.ffcv.*: the ffcv backend's settings


@dataclass
class AugmentConfig:
    global_size: int = checked(224, POSITIVE)  # side of the 2 global views in px (official: 224)
    local_size: int = checked(96, POSITIVE)  # side of the local views in px (official: 96)
    num_local: int = checked(12, NON_NEGATIVE)  # official default (--local_crops_number 12); 6 is the
                                    # common cheaper setting
    global_scale: tuple[float, float] = checked((0.4, 1.0), AREA_RANGE)  # [min, max] area fraction of a global
                                    # crop (RandomResizedCrop scale; official --global_crops_scale 0.4 1)
    local_scale: tuple[float, float] = checked((0.05, 0.4), AREA_RANGE)  # [min, max] area fraction of a local
                                    # crop (official --local_crops_scale 0.05 0.4)
    jitter: tuple[float, float, float, float] = checked((0.4, 0.4, 0.2, 0.1), STRENGTHS)  # brightness, contrast,
                                    # saturation, hue
    jitter_p: float = checked(0.8, PROBABILITY)  # probability of applying the colour jitter to a view
    gray_p: float = checked(0.2, PROBABILITY)  # probability of turning a view grey (RandomGrayscale)
    global_blur_p: tuple[float, float] = checked((1.0, 0.1), PROBABILITIES)  # blur probability of global
                                    # views 1 and 2 (TWIST/BYOL)
    global_solarize_p: tuple[float, float] = checked((0.0, 0.2), PROBABILITIES)  # solarize probability of
                                    # global views 1 and 2
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean subtracted after augmentation (RGB, 0-1)
    std: tuple[float, float, float] = checked(IMAGENET_STD, SPREADS)  # per-channel std divided by (RGB, 0-1)
    max_side: int = 1024            # GPU path: images with a longer side are downscaled first (caps canvas memory)
    # Crops are resized bilinearly (roi_align / DALI / FFCV), with box-filter antialiasing when shrinking; the
    # official code resizes with PIL bicubic (RandomResizedCrop(..., BICUBIC)). Not configurable.


@dataclass
class EvalConfig:
    """The evaluation view (evaluate.py's protocols, the online monitor, --baseline pixels): resize the shorter
    side, then centre crop; the supervised protocols' training view is a RandomResizedCrop of `crop`."""
    resize: int = 256               # shorter side resized to this many px
    crop: int = 224                 # then a centre crop of this side (and the supervised protocols' train crop)


@dataclass
class ModelConfig:
    arch: str = "resnet50"          # resnet18 | resnet50 | resnet50w2 | vit_small | vit_base
    drop_path: float = 0.0          # ViT stochastic depth (official ViT-B: 0.1)
    depth: int = checked(0, NON_NEGATIVE)  # 0: the architecture's own. > 0: a shallower backbone of the same family
                                    # (rehearsals, smoke tests, small images): at most this many blocks per
                                    # ResNet stage (resnet50: 3,4,6,3), or this many ViT blocks (12);
                                    # configs/fmnist_full.yaml sets 1 (a ResNet-10)
    stem: str = "imagenet"          # ResNet stem: imagenet (7x7/2 conv + max-pool) | cifar (3x3/1 conv, no max-pool:
                                    # small images keep 4x the resolution into layer1, at ~16x layer cost per pixel)
    head_hidden: int = 4096         # width of the head's hidden layers (official TWIST: 4096)
    head_dim: int = checked(4096, POSITIVE)  # K, the number of "classes" TWIST estimates
    head_act: str = "relu"          # relu | gelu (activation of the head's hidden layers; official ViT: gelu)
    head_trunc_init: bool = False   # head Linear weights trunc_normal(std 0.02), biases 0 (--proj_trunc_init);
                                    # always on with a ViT backbone, as in the official code
    head_bn: str = "bunch"          # last BN of the head: bunch (the official default --lbn_type bn, train.py L45,
                                    # L191-204: SyncBN over model.bunch_size samples of consecutive ranks; one
                                    # process: its own batch) | bn (per process) | syncbn (all ranks) | identity
    bunch_size: int = 256           # samples per bunch-BN group; bunch_size / data.batch_size ranks per group
    sync_bn: bool = True            # backbone and head-MLP BN -> SyncBatchNorm under DDP on CUDA (the official code;
                                    # the head's last norm follows model.head_bn). false is the fast option: torch's
                                    # SyncBN syncs the host once per layer and breaks compiled graphs
    sync_bn_group: int = checked(0, NON_NEGATIVE)  # ranks per SyncBatchNorm group (consecutive ranks); 0 = all ranks.
                                    # Official Self-Classifier: 22 (--syncbn_process_group_size 22, of 66 processes)
    momentum_encoder: bool = False  # EMA teacher on the global views (the official ViT recipes)
    momentum_start: float = 0.996   # teacher momentum, cosine to momentum_end over the TWIST epochs
    momentum_end: float = 1.0       # teacher momentum at the end of the TWIST epochs


@dataclass
class LossConfig:
    lam1: float = 0.0               # weight on the per-sample entropy is (1 + lam1)
    lam2: float = 1.0               # weight on the entropy of the mean distribution
    tau: float = 1.0                # temperature of the entropy terms
    eps: float = 1e-5               # added inside the logs of the entropy and KL terms (official: 1e-5)


@dataclass
class SelfLabelConfig:
    """TWIST's self-labeling phase (the official `--mme_epochs`, `--lr_sl`, harder crops): from `start_epoch` to
    `train.epochs` the objective is a confidence-thresholded cross-entropy from the more confident global view.
    methods/twist/phases.py turns these into the per-step crop spec, lr, quantile and teacher momentum."""
    start_epoch: int = 0            # epochs of the TWIST objective before self-labeling (0: no self-labeling;
                                    # official RN50: 800 of 850)
    lr: float = 0.05                # peak lr per 256 samples of the phase (its own warmup from 0, then cosine)
    warmup_epochs: float = 5.0      # linear warmup of the phase's lr from 0 (official --warmup_epochs_sl)
    global_scale: tuple[float, float] = checked((0.14, 1.0), AREA_RANGE)  # harder global crops during the phase
    local_scale: tuple[float, float] = checked((0.05, 0.14), AREA_RANGE)  # harder local crops during the phase
    quantile: float = checked(0.5, UNIT)  # confidence threshold = this quantile of the batch's max-probs, following a
    quantile_end: float = checked(0.6, UNIT)  # cosine to quantile_end over the phase


@dataclass
class SelfClassifierConfig:
    """Self-Classifier (arXiv 2103.10994), read when method=self_classifier (model.arch is shared; model.head_*
    and loss.* are TWIST's). Defaults: the official ImageNet recipe (scripts/train_800ep.sh)."""
    classes: tuple[int, ...] = checked((1000, 2000, 4000, 8000), SIZES)  # one classifier per entry (--cls-size);
                                    # several sizes help, and over-clustering (C > true classes) is fine: `evaluate.py
                                    # cluster --classifier N` reads one of them
    hidden_dim: int = checked(4096, POSITIVE)  # MLP hidden width (--hidden-dim)
    dim: int = checked(128, POSITIVE)  # embedding size, L2-normalised, fed to the classifiers (--dim)
    mlp_layers: int = checked(2, NON_NEGATIVE)  # Linear layers in the MLP (--num-hidden):
                                    # 2 = Linear-BN-LeakyReLU-Linear
    row_tau: float = checked(0.1, POSITIVE)  # softmax temperature over classes, for predictions (--row-tau)
    col_tau: float = checked(0.05, POSITIVE)  # softmax temperature over the batch, for targets (--col-tau); keep it
                                    # below row_tau (the paper's ablation: 0.1 / 0.05 best)
    eps: float = checked(1.0e-12, NON_NEGATIVE)  # in log(x + eps) and the L1 normalisations (--eps)
    fixed_norm: bool = False        # keep the classifiers' weight_g at 1 (official: set to 1, then trained)
    queue_len: int = checked(262144, NON_NEGATIVE)  # nearest-neighbour queue of past view-1 embeddings (--queue-len):
                                    # once it is full, view 1's embedding is replaced by its nearest neighbour in the
                                    # queue (the paper's v2 augmentation, official scripts/train_800ep.sh). 0 disables
                                    # it (--no-nn-aug). Costs queue_len x dim x 4 bytes of device memory and checkpoint
                                    # (128 MiB at the default); use a queue shorter than the dataset on small sets


@dataclass
class OptimConfig:
    name: str = "lars"              # lars | sgd | adamw
    lr: float = checked(0.5, POSITIVE)  # per 256 samples; scaled by global batch / 256
    weight_decay: float = 1.5e-6    # weight decay at the start (cosine to weight_decay_end)
    weight_decay_end: float = 1.5e-6  # cosine schedule of wd from weight_decay to this value
    momentum: float = 0.9           # momentum of lars and sgd (adamw keeps its default betas)
    lars_eta: float = 0.001         # LARS trust coefficient eta (official lars.py / apex LARC: 0.001)
    decay_params: str = "auto"      # which parameters get weight decay and LARS adaptation: exclude (not biases,
                                    # norm parameters, ViT pos_embed/cls_token: official TWIST) | all (official
                                    # Self-Classifier) | auto (exclude for twist, all for self_classifier)
    warmup_epochs: float = 10.0     # linear lr warmup (from warmup_start_ratio x peak), then cosine
    min_lr_ratio: float = 0.001     # final lr as a fraction of the peak (official TWIST: always 0.001)
    warmup_start_ratio: float = checked(0.0, UNIT)  # warmup starts from this fraction of the peak lr (0: from zero)
    clip_grad: float = 0.0          # max grad norm; 0 disables


@dataclass
class TrainConfig:
    epochs: int = checked(100, POSITIVE)  # total epochs, the self-labeling phase included; the schedules' length
    seed: int = 0                   # seeds the weights, the sample order and every augmentation draw
    out_dir: str = "runs/default"   # run folder: checkpoint.pt, log.jsonl, config.yaml, env.json (relative paths:
                                    # against the working directory)
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True      # NHWC model and inputs (faster convolutions with bf16/fp16 on GPUs)
    compile: bool = False           # torch.compile the model (before DDP)
    compile_backend: str = "inductor"  # torch.compile's backend for the model and the GPU augmentation engine:
                                    # inductor (fast kernels) | aot_eager | eager (dynamo's tracing, guards and
                                    # graph breaks without code generation: rehearses a compiled run in seconds)
    deterministic: bool = False     # GPU: deterministic kernels (torch.use_deterministic_algorithms, cuDNN without
                                    # autotuning, a fixed cuBLAS workspace): slower; ops with no deterministic
                                    # version warn. The CPU is deterministic without it (README, "Reproducibility")
    log_every: int = checked(10, POSITIVE)  # steps between JSONL log lines (the only host syncs in the loop)
    threads: int = checked(0, OFF_AT_ZERO)  # CPU intra-op threads per process (0: torch's default, one per
                                    # core). CPU results are bit-identical for the same seed, config, data and
                                    # thread count, whatever the load and data.workers; another count changes
                                    # the order of float sums, and so the numbers (README, "Reproducibility")
    tensorboard: bool = False       # also write the logged scalars as TensorBoard events to out_dir/tensorboard
                                    # (rank 0, files only; needs the `tensorboard` extra)
    ckpt_every_steps: int = 0       # 0: only at epoch ends
    ckpt_every_epochs: int = 1      # also write checkpoint.pt every N epoch ends (written atomically)
    keep_every_epochs: int = checked(0, OFF_AT_ZERO)  # also keep checkpoint_e0100.pt-style copies every N epochs (0:
                                    # only the rolling checkpoint.pt); hard links where the file system allows, so they
                                    # cost no write
    keep_last: int = checked(0, OFF_AT_ZERO)  # kept copies to retain, newest first (0: all); a ResNet-50 one is ~0.3 GB
    monitor_every_epochs: int = checked(0, OFF_AT_ZERO)  # online kNN monitor every N epochs (0: off): rank 0 logs
                                    # monitor_knn_top1; costs one pass over monitor_bank + monitor_queries images.
                                    # A fresh run also measures at step 0, with the raw-pixel kNN on the same
                                    # images (monitor_pixels_knn_top1): the curve's two references
    monitor_split: str = ""         # split the monitor queries ("": data.val_split when it exists, else held-out
                                    # training images outside the bank)
    monitor_bank: int = checked(2000, POSITIVE)  # labelled training images in the monitor's kNN bank (~2 per class on
                                    # ImageNet is noisy but shows the trend; 10k for a steadier curve)
    monitor_queries: int = checked(1000, POSITIVE)  # held-out images classified against the bank
    monitor_k: int = checked(20, POSITIVE)  # neighbours (weighted kNN, temperature 0.07, as evaluate.py knn)
    max_steps: int = 0              # stop after this many steps in total (0: no limit) — smoke tests
    skip_nonfinite: bool = False    # skip steps whose loss is NaN/inf (one host sync per step) instead of stopping
    device: str = "auto"            # auto | cpu | cuda


@dataclass
class DistConfig:
    backend: str = "auto"           # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_min: int = 30           # collective timeout before a stuck rank fails the job (minutes)


@dataclass
class Config:
    method: str = "twist"           # twist | self_classifier: the head and objective; data, multi-crop, optimiser,
                                    # AMP, DDP, checkpoints and evaluation are shared
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    self_label: SelfLabelConfig = field(default_factory=SelfLabelConfig)
    self_classifier: SelfClassifierConfig = field(default_factory=SelfClassifierConfig)


_CHOICES = {
    "method": tuple(METHODS),              # the registries: methods/registry.py, pipelines, models/backbones.py
    "data.backend": BACKENDS,
    "data.augment_device": ("auto", "cpu", "cuda"),
    "data.decode_device": ("auto", "cpu", "cuda"),
    "model.arch": ARCHS,
    "model.head_bn": ("bn", "bunch", "syncbn", "identity"),
    "model.head_act": ("relu", "gelu"),
    "model.stem": ("imagenet", "cifar"),
    "data.dali.decode": ("full", "fused"),
    "optim.name": ("lars", "sgd", "adamw"),
    "optim.decay_params": ("auto", "exclude", "all"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.device": ("auto", "cpu", "cuda"),
    "dist.backend": ("auto", "nccl", "gloo"),
}


def validate(cfg: Config) -> None:
    """Raise ConfigError on the first wrong value: a choice (_CHOICES), a field's range rule, a cross-field check."""
    for key, choices in _CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in choices:
            raise ConfigError(f"config key '{key}': '{value}' is not one of {', '.join(choices)}")
    for key, rule, value in ruled_fields(cfg):
        if not (all(rule.ok(v) for v in value) if rule.each else rule.ok(value)):
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"config key '{key}': {rule.says}, got {shown}")

    t, m = cfg.train, cfg.model
    if cfg.method == "twist" and m.head_bn == "bunch" and m.bunch_size % cfg.data.batch_size:
        raise ConfigError(f"config key 'model.bunch_size': {m.bunch_size} is not a multiple of data.batch_size="
                          f"{cfg.data.batch_size} (bunch BN groups whole ranks, as the official assertion "
                          f"bunch_size % batch_size == 0); change one of them")
    if m.stem != "imagenet" and m.arch.startswith("vit"):
        raise ConfigError(f"config key 'model.stem': {m.stem} applies to ResNets only, not model.arch={m.arch}")
    if not 0 <= cfg.self_label.start_epoch <= t.epochs:
        raise ConfigError(f"config key 'self_label.start_epoch': must be in [0, train.epochs={t.epochs}], "
                          f"got {cfg.self_label.start_epoch}")
    if cfg.method != "twist" and (m.momentum_encoder or 0 < cfg.self_label.start_epoch < t.epochs):
        raise ConfigError(f"model.momentum_encoder and the self-labeling phase (self_label.start_epoch) are TWIST options; "
                          f"method={cfg.method} does not use them")


def decays_all_params(cfg: Config) -> bool:
    """optim.decay_params resolved: True when every parameter gets weight decay and LARS adaptation."""
    if cfg.optim.decay_params == "auto":
        return cfg.method == "self_classifier"
    return cfg.optim.decay_params == "all"


def twist_epochs(cfg: Config) -> int:
    """Epochs of the TWIST objective before the self-labeling phase (self_label.start_epoch; 0 = all)."""
    return cfg.self_label.start_epoch or cfg.train.epochs
