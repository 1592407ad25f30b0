"""Shared fixtures: a tiny real-image dataset and a config sized for CPU tests."""
from __future__ import annotations

import pytest
import torch

from engine.config import Config, load_config
from tools.demo_data import build_demo


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """ImageNet-layout folder: 10 classes x 12 train / 4 val images of 32 px (Fashion-MNIST when installed,
    bundled photos otherwise)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    build_demo(out, limit_per_class=12, val_per_class=4, size=32)
    return out


def tiny_config(data_path, out_dir, *extra: str) -> Config:
    """A real recipe (configs/demo.yaml) shrunk to seconds on a CPU."""
    overrides = [
        f"data.path={data_path}", f"train.out_dir={out_dir}", "data.batch_size=16", "data.workers=0",
        "augment.global_size=32", "augment.local_size=16", "augment.num_local=2", "augment.eval_resize=32",
        "augment.eval_crop=32", "model.head_hidden=64", "model.head_dim=16", "train.epochs=2",
        "train.log_every=1", "optim.warmup_epochs=0.5", *extra,
    ]
    return load_config("configs/demo.yaml", overrides)


@pytest.fixture
def cpu_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)
