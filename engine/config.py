"""Typed configuration: recipes (YAML) and dotted command-line overrides read into the schema of
engine/config_schema.py.

    cfg = load_config("configs/demo.yaml", ["optim.lr=0.3", "train.epochs=2"])

Unknown keys and values of the wrong type are rejected with one line naming the key and what to do; a key that
moved names its new place.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import yaml

from engine.config_schema import Config, ConfigError, validate  # Config, ConfigError: the config API


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
    elif origin is tuple and typing.get_args(tp)[-1] is Ellipsis:  # tuple[int, ...]: one or more
        item = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(value) > 0:
            return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
        raise ConfigError(f"config key '{key}': expected a non-empty list, got {value!r}")
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        raise ConfigError(f"config key '{key}': expected a list of {len(args)} numbers, got {value!r}")
    raise ConfigError(f"config key '{key}': expected {getattr(tp, '__name__', tp)}, got {value!r} "
                      f"({type(value).__name__})")


# Keys that moved: an old key in a recipe or override stops with one line naming its new place; configs stored in
# older checkpoints are migrated silently (config_from_dict).
MOVED = {"data.dali_threads": "data.dali.threads",
         "data.dali_hw_decoder_load": "data.dali.hw_decoder_load",
         "data.dali_preallocate": "data.dali.preallocate",
         "data.dali_memory_padding": "data.dali.memory_padding",
         "data.dali_prefetch": "data.dali.prefetch",
         "data.dali_decode": "data.dali.decode",
         "data.dali_shuffle_buffer": "data.dali.shuffle_buffer",
         "data.ffcv_os_cache": "data.ffcv.os_cache",
         "augment.eval_resize": "eval.resize",
         "augment.eval_crop": "eval.crop",
         "train.mme_epochs": "self_label.start_epoch",
         "optim.lr_sl": "self_label.lr",
         "optim.sl_warmup_epochs": "self_label.warmup_epochs",
         "augment.sl_global_scale": "self_label.global_scale",
         "augment.sl_local_scale": "self_label.local_scale",
         "loss.quantile": "self_label.quantile",
         "loss.quantile_end": "self_label.quantile_end"}


def _migrate(data: dict) -> dict:
    """A stored config dict with its moved keys put in their new places."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in MOVED.items():
        sec, key = old.split(".")
        if key in data.get(sec, {}):
            value = data[sec].pop(key)
            *path, leaf = new.split(".")
            node = data
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
    return data


def _merge(obj, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in MOVED:
            raise ConfigError(f"config key '{full}' has moved to '{MOVED[full]}'; rename it")
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


RECIPES = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A recipe path as given, else relative to the project (`configs/demo.yaml` works from any directory),
    else a bare recipe name (`demo`, `rn50_multicrop.yaml`) in the project's configs/."""
    path = Path(path)
    for cand in (path, RECIPES.parent / path, RECIPES / path, RECIPES / f"{path}.yaml"):
        if cand.is_file():
            return cand
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise ConfigError(f"config file '{path}' not found; pass a YAML path or one of the recipes: {names}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        path = resolve_config_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        _merge(cfg, data)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply dotted `key=value` overrides in place, make the paths absolute (resolve_paths), then validate."""
    for ov in overrides or []:
        key, value = parse_override(ov)
        _merge(cfg, _nest(key, value))
    resolve_paths(cfg)
    validate(cfg)
    return cfg


def resolve_paths(cfg: Config) -> Config:
    """data.path and train.out_dir made absolute when the config is loaded, so that the run's config.yaml and
    checkpoint name the same folders whatever directory a later command (evaluate.py, --resume) runs from. A
    relative path is taken from the working directory; a data.path that exists only in the project (the demo set,
    data/demo) from the project, as recipes are (resolve_config_path)."""
    data = Path(cfg.data.path).expanduser()
    if not data.is_absolute() and not data.exists() and (RECIPES.parent / data).exists():
        data = RECIPES.parent / data
    cfg.data.path = os.path.abspath(data)
    cfg.train.out_dir = os.path.abspath(Path(cfg.train.out_dir).expanduser())
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (as stored in checkpoints)."""
    cfg = Config()
    _merge(cfg, _migrate(data))
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
