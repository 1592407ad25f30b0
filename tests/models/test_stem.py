"""model.stem=cifar: the small-image ResNet stem on the same backbone code path."""
import pytest
import torch
import torchvision

from engine.config import ConfigError, load_config
from models.backbones import build_backbone
from methods.registry import build_model


def test_cifar_stem_keeps_resolution_and_torchvision_names():
    net, dim = build_backbone("resnet18", stem="cifar")
    ref, _ = build_backbone("resnet18")
    assert dim == 512 and net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert list(net.state_dict()) == list(ref.state_dict())            # same names: same checkpoints/tools
    x = torch.randn(2, 3, 28, 28)
    seen = {}
    net.layer1.register_forward_hook(lambda m, i, o: seen.update(cifar=o.shape[-1]))
    ref.layer1.register_forward_hook(lambda m, i, o: seen.update(imagenet=o.shape[-1]))
    assert net.eval()(x).shape == (2, 512) and ref.eval()(x).shape == (2, 512)
    assert seen == {"cifar": 28, "imagenet": 7}
    sd = {k: v for k, v in net.state_dict().items() if k != "conv1.weight"}
    tv = torchvision.models.resnet18()
    missing, unexpected = tv.load_state_dict(sd, strict=False)
    assert set(missing) == {"conv1.weight", "fc.weight", "fc.bias"} and not unexpected


@pytest.mark.parametrize("method", ["twist", "self_classifier"])
def test_both_methods_build_the_stem_from_the_config(method):
    cfg = load_config("configs/demo.yaml", [f"method={method}", "model.stem=cifar"])
    assert build_model(cfg).backbone.conv1.stride == (1, 1)


def test_stem_is_for_resnets_only():
    with pytest.raises(ConfigError, match="model.stem"):
        load_config("configs/demo.yaml", ["model.arch=vit_small", "model.stem=cifar"])
    with pytest.raises(ConfigError, match="model.stem"):
        load_config("configs/demo.yaml", ["model.stem=tiny"])
