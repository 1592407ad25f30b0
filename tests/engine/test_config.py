import pytest

from engine.config import Config, ConfigError, config_from_dict, load_config, save_config, to_dict

RECIPES = ["configs/demo.yaml", "configs/rn50_multicrop.yaml", "configs/rn50_2view.yaml"]


@pytest.mark.parametrize("path", RECIPES)
def test_recipes_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_official_recipe_values():
    mc = load_config("configs/rn50_multicrop.yaml")
    assert (mc.model.arch, mc.model.head_dim, mc.data.batch_size) == ("resnet50", 4096, 128)
    assert mc.augment.global_scale == (0.4, 1.0) and mc.augment.local_scale == (0.05, 0.4)
    assert (mc.optim.name, mc.optim.lr, mc.optim.weight_decay) == ("lars", 0.5, 1.5e-6)
    two = load_config("configs/rn50_2view.yaml")
    assert (two.augment.num_local, two.model.head_dim, two.data.batch_size, two.train.epochs) == (0, 32768, 256, 800)


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/demo.yaml", ["optim.lr=0.3", "train.epochs=3", "augment.global_scale=[0.2,0.9]",
                                            "train.compile=true", "optim.weight_decay=1e-4"])
    assert cfg.optim.lr == 0.3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and cfg.train.compile is True
    assert cfg.augment.global_scale == (0.2, 0.9)
    assert cfg.optim.weight_decay == pytest.approx(1e-4)


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=0.3", "unknown config key 'optim.lrr'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("train.epochs=abc", "config key 'train.epochs': expected int"),
    ("train.epochs=2.5", "config key 'train.epochs': expected int"),
    ("augment.global_scale=[0.2]", "config key 'augment.global_scale'"),
    ("optim.name=adam", "config key 'optim.name'"),
    ("data.batch_size=0", "data.batch_size"),
    ("optim.lr", "expected KEY=VALUE"),
])
def test_bad_overrides_give_one_clear_line(override, match):
    with pytest.raises(ConfigError, match=match) as exc:
        load_config("configs/demo.yaml", [override])
    assert "\n" not in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("optim:\n  momentum: fast\n")
    with pytest.raises(ConfigError, match="optim.momentum"):
        load_config(bad)


def test_roundtrip_through_yaml_and_dict(tmp_path):
    cfg = load_config("configs/demo.yaml", ["optim.lr=0.7"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_recipes_are_found_from_any_directory(tmp_path, monkeypatch):
    from engine.config import ConfigError, load_config
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/rn50_multicrop.yaml").model.arch == "resnet50"
    assert load_config("rn50_multicrop").model.arch == "resnet50"
    with pytest.raises(ConfigError, match="not found; pass a YAML path or one of the recipes: .*demo"):
        load_config("configs/nope.yaml")


def test_moved_keys_name_their_new_place_and_old_checkpoint_configs_migrate():
    from engine.config import ConfigError, config_from_dict, load_config, to_dict
    with pytest.raises(ConfigError, match="'data.dali_threads' has moved to 'data.dali.threads'"):
        load_config("configs/demo.yaml", ["data.dali_threads=3"])
    with pytest.raises(ConfigError, match="'train.mme_epochs' has moved to 'self_label.start_epoch'"):
        load_config("configs/demo.yaml", ["train.mme_epochs=1"])
    stored = to_dict(load_config("configs/demo.yaml", ["data.dali.threads=3", "data.ffcv.os_cache=false"]))
    old = {**stored, "data": {k: v for k, v in stored["data"].items() if k not in ("dali", "ffcv")}}
    old["data"].update(dali_threads=3, ffcv_os_cache=False)
    old["train"] = {**stored["train"], "mme_epochs": 1}
    old["loss"] = {**stored["loss"], "quantile_end": 0.7}
    old.pop("self_label")
    cfg = config_from_dict(old)
    assert cfg.data.dali.threads == 3 and cfg.data.ffcv.os_cache is False
    assert cfg.self_label.start_epoch == 1 and cfg.self_label.quantile_end == 0.7


def test_choices_come_from_the_registries():
    from engine.config import ConfigError, load_config
    from methods.registry import METHODS
    from models.backbones import ARCHS
    for arch in ARCHS:
        assert load_config("configs/demo.yaml", [f"model.arch={arch}"]).model.arch == arch
    with pytest.raises(ConfigError, match="'method': 'byol' is not one of " + ", ".join(METHODS)):
        load_config("configs/demo.yaml", ["method=byol"])


def _ruled_keys():
    from engine.config_schema import ruled_fields
    return [pytest.param(key, rule, value, id=key) for key, rule, value in ruled_fields(Config())]


def test_range_rules_are_found_in_every_section():
    keys = {p.id for p in _ruled_keys()}
    assert {"data.dali.threads", "optim.lr", "train.keep_last", "self_classifier.classes",
            "augment.global_blur_p", "self_label.quantile"} <= keys


@pytest.mark.parametrize("key,rule,default", _ruled_keys())
def test_every_range_rule_rejects_an_out_of_range_value_naming_the_key(key, rule, default):
    bad = [rule.bad, *default[1:]] if rule.each else rule.bad
    with pytest.raises(ConfigError) as exc:
        load_config("configs/demo.yaml", [f"{key}={bad}"])
    assert str(exc.value).startswith(f"config key '{key}': {rule.says}, got ")
    assert "\n" not in str(exc.value)


def test_every_setting_says_what_it_is_where_it_is_defined():
    """Each config field carries a description on its own line (a `#` comment) in engine/config_schema.py, except
    the fields that are themselves sections (their classes have docstrings or commented fields)."""
    import ast
    import dataclasses
    from pathlib import Path

    import engine.config_schema as schema

    source = Path(schema.__file__).read_text()
    lines = source.splitlines()
    sections = {name for name, obj in vars(schema).items() if isinstance(obj, type) and dataclasses.is_dataclass(obj)}
    bare = []
    for cls in ast.parse(source).body:
        if not (isinstance(cls, ast.ClassDef) and cls.name in sections):
            continue
        for node in cls.body:
            if not isinstance(node, ast.AnnAssign) or ast.unparse(node.annotation) in sections:
                continue
            if "#" not in lines[node.lineno - 1]:
                bare.append(f"{cls.name}.{node.target.id}")
    assert sections and not bare, f"settings without a description: {bare}"
