"""Which norms become SyncBatchNorm under DDP: the backbone's and the head MLP's, never the head's last norm when
it is per process (model.head_bn=bn) or already reduces over its own group of ranks."""
import torch.nn as nn

from engine.step import convert_sync_bn
from models.dist import GroupBatchNorm1d
from methods.registry import build_model
from tests.conftest import tiny_config


def _norms(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_head_norm_stays_per_process_and_the_rest_is_synced(tmp_path):
    model = build_model(tiny_config(tmp_path, tmp_path, "model.head_bn=bn"))
    before = _norms(model)
    after = _norms(convert_sync_bn(model))
    assert before.keys() == after.keys()
    last = [n for n in after if n.endswith("head.norm")]
    assert len(last) == 1 and after[last[0]] is before[last[0]]
    assert issubclass(after[last[0]], nn.BatchNorm1d) and after[last[0]] is not nn.SyncBatchNorm
    others = [n for n in after if n != last[0]]
    assert len(others) > 10 and all(after[n] is nn.SyncBatchNorm for n in others)
    assert any(n.startswith("backbone") for n in others) and any(".mlp." in n for n in others)


def test_group_norm_is_left_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), GroupBatchNorm1d(4))
    out = convert_sync_bn(net)
    assert type(out[1]) is nn.SyncBatchNorm and type(out[2]) is GroupBatchNorm1d
