"""Typed configuration: one dataclass per concern, YAML recipes, dotted command-line overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=0.3", "train.epochs=2"])

Unknown keys and values of the wrong type are rejected with one line naming the key and what to do.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the fix."""


@dataclass
class DataConfig:
    backend: str = "torch"          # torch | dali | ffcv — which pipeline feeds the GPU; pil = CPU baseline
    path: str = "data/demo"         # ImageNet-layout root with train/ and val/ (or a converted dataset)
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 64            # per process (per GPU); the global batch is batch_size x world_size
    workers: int = 2                # reader processes per GPU (torch, pil); with GPU augmentation 2-4 are plenty
    augment_device: str = "auto"    # auto | cpu | cuda — where the multi-crop engine runs
    decode_device: str = "auto"     # auto | cpu | cuda — cuda: workers only read bytes, nvJPEG decodes in batches
    drop_last: bool = True
    dali_threads: int = 4           # dali backend: CPU threads per pipeline (reading, CPU ops); 2-4 suffice on a GPU
    dali_prefetch: int = 2          # dali backend: batches the pipeline runs ahead (each costs one batch of views)
    dali_decode: str = "full"       # dali backend: full (decode once, crop every view: best for multi-crop) |
                                    # fused (decode only each view's window, once per view: for 1-2 views)
    dali_shuffle_buffer: int = 4096  # dali backend on tar shards: samples in the reader's shuffle buffer


@dataclass
class AugmentConfig:
    global_size: int = 224
    local_size: int = 96
    num_local: int = 6              # official code default is 12; 6 is the common cheaper setting
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    eval_resize: int = 256          # evaluation: resize shorter side, then centre crop
    eval_crop: int = 224
    max_side: int = 1024            # GPU path: images with a longer side are downscaled first (caps canvas memory)


@dataclass
class ModelConfig:
    arch: str = "resnet50"          # resnet18 | resnet50
    head_hidden: int = 4096
    head_dim: int = 4096            # K, the number of "classes" TWIST estimates
    head_bn: str = "bn"             # last BN of the head: bn (per process) | syncbn | identity
    sync_bn: bool = True            # convert backbone/head BN to SyncBatchNorm under DDP on CUDA


@dataclass
class LossConfig:
    lam1: float = 0.0               # weight on the per-sample entropy is (1 + lam1)
    lam2: float = 1.0               # weight on the entropy of the mean distribution
    tau: float = 1.0                # temperature of the entropy terms
    eps: float = 1e-5


@dataclass
class OptimConfig:
    name: str = "lars"              # lars | sgd | adamw
    lr: float = 0.5                 # per 256 samples; scaled by global batch / 256
    weight_decay: float = 1.5e-6
    weight_decay_end: float = 1.5e-6  # cosine schedule of wd from weight_decay to this value
    momentum: float = 0.9
    lars_eta: float = 0.001
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.0       # final lr as a fraction of the peak
    clip_grad: float = 0.0          # max grad norm; 0 disables


@dataclass
class TrainConfig:
    epochs: int = 100
    seed: int = 0
    out_dir: str = "runs/default"
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True
    compile: bool = False           # torch.compile the model (before DDP)
    log_every: int = 10             # steps between JSONL log lines (the only host syncs in the loop)
    ckpt_every_steps: int = 0       # 0: only at epoch ends
    ckpt_every_epochs: int = 1
    max_steps: int = 0              # stop after this many steps in total (0: no limit) — smoke tests
    device: str = "auto"            # auto | cpu | cuda


@dataclass
class DistConfig:
    backend: str = "auto"           # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_min: int = 30


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def _coerce(value, tp, key: str):
    """Check/convert one value to the annotated type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        raise ConfigError(f"config key '{key}': expected a list of {len(args)} numbers, got {value!r}")
    raise ConfigError(f"config key '{key}': expected {getattr(tp, '__name__', tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _merge(obj, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> tuple[list[str], object]:
    """'optim.lr=0.3' -> (['optim', 'lr'], 0.3); the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. optim.lr=0.3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw
    return key.strip().split("."), value


def _nest(path: list[str], value) -> dict:
    out = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; pass one of configs/*.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        _merge(cfg, data)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply dotted `key=value` overrides in place, then validate."""
    for ov in overrides or []:
        key, value = parse_override(ov)
        _merge(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (as stored in checkpoints)."""
    cfg = Config()
    _merge(cfg, data)
    return cfg


def to_dict(cfg: Config) -> dict:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


_CHOICES = {
    "data.backend": ("torch", "pil", "dali", "ffcv"),
    "data.augment_device": ("auto", "cpu", "cuda"),
    "data.decode_device": ("auto", "cpu", "cuda"),
    "data.dali_decode": ("full", "fused"),
    "model.arch": ("resnet18", "resnet50"),
    "model.head_bn": ("bn", "syncbn", "identity"),
    "optim.name": ("lars", "sgd", "adamw"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "dist.backend": ("auto", "nccl", "gloo"),
}


def validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"config key '{key}': '{value}' is not one of {', '.join(choices)}")
    positive = {"data.batch_size": cfg.data.batch_size, "train.epochs": cfg.train.epochs,
                "augment.global_size": cfg.augment.global_size, "model.head_dim": cfg.model.head_dim,
                "train.log_every": cfg.train.log_every, "data.dali_threads": cfg.data.dali_threads,
                "data.dali_prefetch": cfg.data.dali_prefetch}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {value}")
    if cfg.data.workers < 0 or cfg.augment.num_local < 0:
        raise ConfigError("config keys 'data.workers' and 'augment.num_local' must be >= 0")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr': must be > 0, got {cfg.optim.lr}")

