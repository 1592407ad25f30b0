"""kNN over a bank split across 2 gloo ranks equals the single-process kNN over the whole bank."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation.knn_shards import KnnShards
from evaluation.metrics import knn_accuracy


def make_problem():
    """Clustered features (so kNN is far from chance) with uneven shards: rank 0 holds 37 bank rows, rank 1 63."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(7, 16, generator=g)
    bank_labels = torch.randint(0, 7, (100,), generator=g)
    bank = centres[bank_labels] + 2.0 * torch.randn(100, 16, generator=g)
    query_labels = torch.randint(0, 7, (45,), generator=g)
    queries = centres[query_labels] + 2.0 * torch.randn(45, 16, generator=g)
    return bank, bank_labels, queries, query_labels, (slice(0, 37), slice(37, 100))


KS, CHUNK = (5, 20, 150), 8   # k=150 > the bank (100): clamped; small chunks: several merge rounds


def worker(rank: int, init_file: str, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bank, bank_labels, queries, query_labels, parts = make_problem()
        part = parts[rank]
        chunk = CHUNK if rank == 0 else CHUNK + 4   # ranks agree on the smaller chunk
        out[rank] = knn_accuracy(bank[part], bank_labels[part], queries, query_labels, ks=KS, temperature=0.07,
                                 chunk_size=chunk, shards=KnnShards())
    finally:
        dist.destroy_process_group()


def test_sharded_knn_equals_single_process(tmp_path):
    bank, bank_labels, queries, query_labels, _ = make_problem()
    single = knn_accuracy(bank, bank_labels, queries, query_labels, ks=KS, temperature=0.07)
    assert single["knn_top1_k20"] > 100 / 7 * 2          # the problem is learnable: well above chance
    assert single["knn_top1_k5"] != single["knn_top1_k20"]  # and k matters
    out = mp.Manager().dict()
    mp.spawn(worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    assert out[0] == single and out[1] == single
