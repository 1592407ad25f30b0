"""Bunch BN on CPU/gloo: statistics over groups of ranks equal a plain BN over the group's concatenated batch."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from models.dist import GroupBatchNorm1d, bunch_batch_norm, bunch_groups, copy_module


def test_bunch_groups_are_consecutive_ranks():
    assert bunch_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert bunch_groups(4, 4) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="model.bunch_size"):
        bunch_groups(6, 4)
    with pytest.raises(ValueError, match="4 ranks per BN bunch must divide the world size 2"):
        bunch_groups(2, 4)          # a bunch larger than the world stops the run instead of shrinking


def test_single_process_is_plain_batchnorm():
    bn = bunch_batch_norm(5, 2)
    assert isinstance(bn, torch.nn.BatchNorm1d) and not isinstance(bn, GroupBatchNorm1d) and bn.affine is False


class _HostData(TorchDispatchMode):
    """Records ops that make a tensor from Python/host data (torch.tensor, new_tensor)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "lift_fresh" in str(func):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _worker(rank, world, per_group, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x_all = torch.randn(world, 6, 4) * 3 + 1
    x = x_all[rank].clone().requires_grad_(True)
    bn = bunch_batch_norm(4, per_group)
    assert isinstance(bn, GroupBatchNorm1d)
    with _HostData() as host:
        y = bn(x)
    assert host.ops == []      # no tensor made from host data: on CUDA that would be a blocking copy per step
    w = torch.arange(24, dtype=torch.float32).view(6, 4) / 10 + rank
    (y * w).sum().backward()
    # the momentum teacher's copy of a student (two norms holding process groups) shares the groups
    sync = torch.nn.SyncBatchNorm(4, process_group=bn.group)
    twin = copy_module(torch.nn.Sequential(bn, sync))
    assert twin[0].group is bn.group and twin[1].process_group is bn.group and twin[0] is not bn
    twin_y = twin[0](x.detach())
    torch.save({"y": y.detach(), "grad": x.grad, "rm": bn.running_mean, "rv": bn.running_var, "twin_y": twin_y},
               os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world,per_group", [(2, 2), (4, 2)])
def test_group_bn_matches_bn_over_the_group(world, per_group, tmp_path):
    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(world, per_group, init, str(tmp_path)), nprocs=world, join=True)
    torch.manual_seed(0)
    x_all = torch.randn(world, 6, 4) * 3 + 1
    for g0 in range(0, world, per_group):
        ranks = list(range(g0, g0 + per_group))
        x = torch.cat([x_all[r] for r in ranks]).requires_grad_(True)
        ref = torch.nn.BatchNorm1d(4, affine=False)
        y = ref(x)
        w = torch.cat([torch.arange(24, dtype=torch.float32).view(6, 4) / 10 + r for r in ranks])
        (y * w).sum().backward()
        for k, r in enumerate(ranks):
            got = torch.load(tmp_path / f"{r}.pt")
            assert torch.allclose(got["y"], y[6 * k:6 * (k + 1)].detach(), atol=1e-5)
            assert torch.equal(got["twin_y"], got["y"])      # the copy normalises over the same group
            assert torch.allclose(got["grad"], x.grad[6 * k:6 * (k + 1)], atol=1e-5)
            assert torch.allclose(got["rm"], ref.running_mean, atol=1e-5)
            assert torch.allclose(got["rv"], ref.running_var, atol=1e-4)


OFFICIAL_LBN_TYPE_DEFAULT = "bn"      # bytedance/TWIST 796d36e train.py L45: add_argument('--lbn_type', default='bn')
OFFICIAL_BUNCH_SIZE_DEFAULT = 256     # train.py L97: add_argument('--bunch-size', default=256)
HEAD_BN_OF_LBN_TYPE = {"bn": "bunch", "syncbn": "syncbn", "identity": "identity"}   # train.py L191-208


def official_rank_groups(world, bunch_size, batch_size):
    """train.py L192-198, ProjectionHead.__init__ under lbn_type 'bn': the SyncBatchNorm groups."""
    assert bunch_size % batch_size == 0
    ranks = list(range(world))
    procs_per_bunch = bunch_size // batch_size
    assert world % procs_per_bunch == 0
    n_bunch = world // procs_per_bunch
    return [ranks[i*procs_per_bunch: (i+1)*procs_per_bunch] for i in range(n_bunch)]


def test_head_bn_default_is_the_official_lbn_type_default():
    from engine.config import Config
    from methods.twist.model import TwistModel
    from models.dist import LocalBatchNorm1d
    m = Config().model
    assert m.head_bn == HEAD_BN_OF_LBN_TYPE[OFFICIAL_LBN_TYPE_DEFAULT] and m.bunch_size == OFFICIAL_BUNCH_SIZE_DEFAULT
    for world, batch in [(16, 128), (8, 64), (4, 256), (32, 32)]:
        assert bunch_groups(world, m.bunch_size // batch) == official_rank_groups(world, m.bunch_size, batch)
    single = TwistModel.from_config(m.__class__(arch="resnet18", head_hidden=8, head_dim=4), batch_size=64)
    assert isinstance(single.head.norm, LocalBatchNorm1d)   # one process: its own batch, as head_bn=bn
