"""On CUDA the training step makes no host synchronisation (losses stay on the device; `.item()` only at log
steps): the official recipe's step (LARS, bf16, channels-last, head BN) runs under
torch.cuda.set_sync_debug_mode("error"), which raises on any sync."""
import pytest
import torch

from engine.distributed import DistInfo
from engine.precision import resolve_precision
from engine.trainer import build_training
from pipelines.spec import MultiCropSpec
from tests.conftest import tiny_config
from tools.profiler import synthetic_views

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (host-sync check)")


def test_training_step_makes_no_host_sync(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, "train.device=cuda", "train.precision=bf16", "optim.name=lars",
                      "optim.clip_grad=3.0")
    dev = torch.device("cuda", torch.cuda.current_device())
    precision = resolve_precision(cfg.train.precision, dev)
    _, net, _, step = build_training(cfg, DistInfo(device=dev), 10, precision)
    views = synthetic_views(MultiCropSpec.from_config(cfg.augment), 16, precision.input_dtype, dev, True)
    before = [p.detach().clone() for p in net.parameters()]
    for i in range(2):                    # warm-up: lazy initialisations may sync once
        step(views, i)
    torch.cuda.synchronize()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 5):
            out = step(views, i)
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    assert torch.isfinite(out["total"]).item()
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))   # the step did update
