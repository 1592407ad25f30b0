"""`train.compile=true`: the model the recipes compile makes one graph for all its views, with no graph break and
no recompilation over steps. Counted with dynamo's `CompileCounter` backend: dynamo's tracing and guards exactly as
on a GPU, the graph then run eagerly on the CPU."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from engine.config import load_config
from engine.distributed import DistInfo
from engine.precision import resolve_precision
from engine.trainer import build_training
from pipelines.spec import MultiCropSpec

TINY = ["train.compile=true", "data.batch_size=8", "augment.global_size=32", "augment.local_size=16",
        "augment.num_local=2", "model.head_hidden=32", "model.head_dim=16", "train.device=cpu"]


def compiled_steps(monkeypatch, recipe: str, *extra: str, steps: int = 3):
    """(graphs, graph-break reasons, per-step losses) of `steps` training steps of `recipe` compiled."""
    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, **{**kw, "backend": counter}))
    counters.clear()
    cfg = load_config(recipe, [*TINY, *extra])
    info = DistInfo(device=torch.device("cpu"))
    precision = resolve_precision(cfg.train.precision, info.device)
    _, net, _, step = build_training(cfg, info, 10, precision)
    net.train()
    spec = MultiCropSpec.from_config(cfg.augment)
    g = torch.Generator().manual_seed(0)
    losses = []
    for i in range(steps):
        views = [torch.randn(8, 3, s, s, generator=g).to(memory_format=torch.channels_last)
                 for s in spec.view_sizes()]           # both resolutions, new values every step
        losses.append(float(step(views, i, torch.arange(8 * i, 8 * i + 8))["total"]))
    assert all(map(lambda x: x == x, losses))          # finite: the compiled step really trained
    return counter.frame_count, list(counters["graph_break"]), losses


@pytest.mark.parametrize("recipe,extra", [
    ("demo", ["model.momentum_encoder=true"]),         # ResNet + the momentum teacher (not compiled: a copy)
    ("vit_small", []),                                 # ViT, both resolutions through one interpolated graph
], ids=["resnet", "vit"])
def test_twist_model_compiles_to_one_graph_without_breaks(monkeypatch, recipe, extra):
    graphs, breaks, _ = compiled_steps(monkeypatch, recipe, *extra)
    assert breaks == [] and graphs == 1


def test_self_classifier_queue_is_the_one_declared_break(monkeypatch):
    """The nearest-neighbour queue runs eagerly (`torch.compiler.disable`: its write position is Python state
    that would otherwise be a recompilation every step): exactly one break, two graphs, none added per step."""
    graphs, breaks, _ = compiled_steps(monkeypatch, "demo_self_classifier", "self_classifier.queue_len=16",
                                       "self_classifier.classes=[10,20]", "model.arch=resnet18")
    assert len(breaks) == 1 and "swap_first_view" in breaks[0] and graphs == 2
