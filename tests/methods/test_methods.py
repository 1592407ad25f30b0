import pytest
import torch

from engine.config_schema import _CHOICES
from methods.registry import METHODS, build_model, get_method, loss_fn
from methods.self_classifier.model import SelfClassifierModel
from methods.twist.model import TwistModel
from tests.conftest import tiny_config


def test_config_choices_are_the_registry():
    assert tuple(METHODS) == _CHOICES["method"]


@pytest.mark.parametrize("method,cls", [("twist", TwistModel), ("self_classifier", SelfClassifierModel)])
def test_each_method_builds_and_scores_its_outputs(tmp_path, method, cls):
    cfg = tiny_config(tmp_path, tmp_path / "run", f"method={method}", "self_classifier.classes=[4,6]",
                      "self_classifier.hidden_dim=32", "self_classifier.dim=8", "model.arch=resnet18")
    model = build_model(cfg)
    assert isinstance(model, cls)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    losses = loss_fn(cfg)(model(views))
    assert "total" in losses and losses["total"].ndim == 0 and torch.isfinite(losses["total"])


def test_unknown_method_is_one_clear_line():
    with pytest.raises(ValueError, match="method 'swav' is not one of twist, self_classifier"):
        get_method("swav")
