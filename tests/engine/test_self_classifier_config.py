import pytest

from engine.config import ConfigError, load_config
from engine.optim import Schedule

RECIPES = ["configs/self_classifier_rn50.yaml", "configs/demo_self_classifier.yaml"]


@pytest.mark.parametrize("path", RECIPES)
def test_recipes_select_self_classifier(path):
    assert load_config(path).method == "self_classifier"


def test_existing_recipes_default_to_twist():
    for path in ("configs/demo.yaml", "configs/rn50_multicrop.yaml", "configs/rn50_2view.yaml"):
        cfg = load_config(path)
        assert cfg.method == "twist"
        if path != "configs/demo.yaml":   # the demo's grey images get no blur or solarization
            assert (cfg.augment.global_blur_p, cfg.augment.global_solarize_p) == ((1.0, 0.1), (0.0, 0.2))
        assert cfg.optim.warmup_start_ratio == 0.0


def test_official_recipe_values_and_schedule_at_batch_4096():
    cfg = load_config("configs/self_classifier_rn50.yaml")
    sc = cfg.self_classifier
    assert (sc.classes, sc.hidden_dim, sc.dim, sc.mlp_layers) == ((1000, 2000, 4000, 8000), 4096, 128, 2)
    assert (sc.row_tau, sc.col_tau) == (0.1, 0.05)
    a = cfg.augment
    assert (a.global_size, a.local_size, a.num_local, a.global_scale, a.local_scale) == (
        224, 96, 6, (0.4, 1.0), (0.05, 0.4))
    assert (a.global_blur_p, a.global_solarize_p) == ((0.1, 1.0), (0.0, 0.2))
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.train.epochs) == ("lars", 1e-6, 800)
    steps = 312  # ImageNet at 4092 per step (62 x 66 processes)
    s = Schedule(cfg.optim, steps, cfg.train.epochs, global_batch=4092)
    assert s.peak == pytest.approx(3.2)                                   # --lr 3.2
    assert s.lr(0) == pytest.approx(0.2)                                  # --start-warmup 0.2
    assert s.lr(10 * steps) == pytest.approx(3.2)                         # after --warmup-epochs 10
    assert s.lr(800 * steps) == pytest.approx(0.0032)                     # --final-lr 0.0032


@pytest.mark.parametrize("override,match", [
    ("method=swav", "config key 'method': 'swav' is not one of twist, self_classifier"),
    ("self_classifier.classes=[]", "config key 'self_classifier.classes': expected a non-empty list"),
    ("self_classifier.classes=[10,0]", "config key 'self_classifier.classes': sizes must be > 0"),
    ("self_classifier.col_tau=0", "config key 'self_classifier.col_tau': must be > 0"),
    ("self_classifier.rowtau=0.1", "unknown config key 'self_classifier.rowtau'"),
    ("augment.global_blur_p=[1.5,0]", "config key 'augment.global_blur_p'"),
    ("optim.warmup_start_ratio=2", "config key 'optim.warmup_start_ratio'"),
])
def test_bad_values_give_one_clear_line(override, match):
    with pytest.raises(ConfigError, match=match) as exc:
        load_config("configs/demo.yaml", [override])
    assert "\n" not in str(exc.value)


def test_classes_accept_a_single_size():
    cfg = load_config("configs/demo.yaml", ["method=self_classifier", "self_classifier.classes=10"])
    assert cfg.self_classifier.classes == (10,)


def test_global_view_blur_and_solarize_reach_the_spec():
    from pipelines.spec import MultiCropSpec
    sc = MultiCropSpec.from_config(load_config("configs/self_classifier_rn50.yaml").augment).view_groups()
    assert [(g.blur_p, g.solarize_p) for g in sc[:3]] == [(0.1, 0.0), (1.0, 0.2), (0.5, 0.0)]
    tw = MultiCropSpec.from_config(load_config("configs/rn50_multicrop.yaml").augment).view_groups()
    assert [(g.blur_p, g.solarize_p) for g in tw[:3]] == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]


def test_warmup_can_start_above_zero():
    from engine.optim import lr_at
    assert lr_at(0, 100, 10, 2.0) == 0.0                                  # default: from 0
    assert lr_at(0, 100, 10, 2.0, start=1.0) == pytest.approx(1.0)
    assert lr_at(5, 100, 10, 2.0, start=1.0) == pytest.approx(1.5)
    assert lr_at(10, 100, 10, 2.0, start=1.0) == pytest.approx(2.0)
