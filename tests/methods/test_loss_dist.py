"""The TWIST loss under torch.distributed (gloo, 2 ranks): every batch mean in ONE all-reduce, with exactly the
values and gradients of one all-reduce per term, and the global-batch values of a single process."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from methods.twist.loss import twist_loss, view_pairs

WORLD, N, K, VIEWS = 2, 6, 5, 4


def _per_term_mean(local: torch.Tensor) -> torch.Tensor:
    """The former reduction: one all-reduce per batch mean."""
    total = local.detach().clone()
    dist.all_reduce(total)
    return local + (total / WORLD - local.detach())


def _per_term_loss(logits, eps=1e-5):
    p = [F.softmax(x.float(), dim=-1) for x in logits]
    pairs = view_pairs(len(p))
    kl = lambda a, b: _per_term_mean((a * ((a + eps).log() - (b + eps).log())).sum(1).mean())  # noqa: E731
    eh_v = [_per_term_mean(-(x * (x + eps).log()).sum(1).mean()) for x in p]
    ms = [_per_term_mean(x.mean(0)) for x in p]
    he_v = [-(m * (m + eps).log()).sum() for m in ms]
    kl_t = sum(0.5 * (kl(p[i], p[j]) + kl(p[j], p[i])) for i, j in pairs) / len(pairs)
    eh = sum(0.5 * (eh_v[i] + eh_v[j]) for i, j in pairs) / len(pairs)
    he = sum(0.5 * (he_v[i] + he_v[j]) for i, j in pairs) / len(pairs)
    return {"kl": kl_t, "eh": eh, "he": he, "total": kl_t + eh - he}


def _logits():
    g = torch.Generator().manual_seed(3)
    return torch.randn(WORLD, VIEWS, N, K, generator=g) * 2


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1]
    try:
        results = {}
        for name, fn in (("batched", twist_loss), ("per_term", _per_term_loss)):
            x = _logits()[rank].clone().requires_grad_(True)
            calls.clear()
            out = fn(list(x))
            out["total"].backward()
            results[name] = {"values": {k: v.detach() for k, v in out.items()}, "grad": x.grad,
                             "calls": list(calls)}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


def test_one_all_reduce_with_the_per_term_results(tmp_path):
    init = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(init, str(tmp_path)), nprocs=WORLD, join=True)
    pairs = len(view_pairs(VIEWS))
    full = twist_loss(list(_logits().permute(1, 0, 2, 3).reshape(VIEWS, WORLD * N, K)))  # one process, all data
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"{rank}.pt")
        b, t = r["batched"], r["per_term"]
        assert len(b["calls"]) == 1 and b["calls"][0] == 2 * pairs + VIEWS + VIEWS * K
        assert len(t["calls"]) == 2 * pairs + 2 * VIEWS
        for k in ("kl", "eh", "he", "total"):
            assert torch.equal(b["values"][k], t["values"][k]), k
            assert torch.allclose(b["values"][k], full[k], atol=1e-6), k
        # the same terms; only autograd's order of accumulating them into the shared softmax differs
        assert torch.allclose(b["grad"], t["grad"], rtol=1e-5, atol=1e-7)
