"""Self-Classifier's nearest-neighbour queue against a transcription of the official code, and its resume."""
import json

import pytest
import torch
import torch.nn.functional as F

from engine import checkpoint as ckpt
from engine.trainer import train
from methods.self_classifier.model import SelfClassifierModel
from methods.self_classifier.nn_queue import NNQueue
from tests.conftest import tiny_config


class OfficialNNQueue:
    """elad-amrani/self-classifier src/utils.py NNQueue (CPU), transcribed."""

    def __init__(self, queue_len=131072, dim=128):
        self.queue_len, self.dim = queue_len, dim
        self.queue = torch.zeros(self.queue_len, self.dim)
        self.queue_targets = torch.zeros(self.queue_len)
        self.queue_indices = torch.zeros(self.queue_len, dtype=torch.long)
        self.ptr = 0
        self.full = False

    def get_nn(self, x, x_indices):
        _, q_indices = (x @ self.queue.T).topk(2)
        sample_indices = self.queue_indices[q_indices]
        indices = torch.where(x_indices == sample_indices[:, 0], q_indices[:, 1], q_indices[:, 0])
        out = self.queue[indices]
        targets = self.queue_targets[indices]
        return out, targets

    def push(self, x, x_targets, x_indices):
        x_size = x.shape[0]
        old_ptr = self.ptr
        if self.ptr + x_size <= self.queue_len:
            self.queue[self.ptr: self.ptr + x_size] = x
            self.queue_targets[self.ptr: self.ptr + x_size] = x_targets
            self.queue_indices[self.ptr: self.ptr + x_size] = x_indices
            self.ptr = (self.ptr + x_size) % self.queue_len
        else:
            self.queue[self.ptr:] = x[:self.queue_len - old_ptr]
            self.queue_targets[self.ptr:] = x_targets[:self.queue_len - old_ptr]
            self.queue_indices[self.ptr:] = x_indices[:self.queue_len - old_ptr]
            self.ptr = (self.ptr + x_size) % self.queue_len
            self.queue[:self.ptr] = x[self.queue_len - old_ptr:]
            self.queue_targets[:self.ptr] = x_targets[self.queue_len - old_ptr:]
            self.queue_indices[:self.ptr] = x_indices[self.queue_len - old_ptr:]
        if not self.full and old_ptr + x_size >= self.queue_len:
            self.full = True


def official_step(queue: OfficialNNQueue, embds: list[torch.Tensor], indices: torch.Tensor) -> list[torch.Tensor]:
    """src/train.py train(): view 1 replaced by its nearest neighbour once the queue is full, then pushed."""
    embds = list(embds)
    embds1 = embds[0].clone().detach()
    if queue.full:
        embds[0], _ = queue.get_nn(embds1, indices)
    queue.push(embds1, torch.zeros(len(indices)), indices)
    return embds


def test_queue_matches_the_official_one_step_by_step_through_wrap_around():
    g = torch.Generator().manual_seed(0)
    n, dim, length, views = 6, 8, 20, 3     # 20 is not a multiple of 6: pushes wrap around the end
    ours, ref = NNQueue(length, dim), OfficialNNQueue(length, dim)
    swapped_steps = 0
    for step in range(12):
        embds = [F.normalize(torch.randn(n, dim, generator=g), dim=1) for _ in range(views)]
        idx = torch.randint(0, 15, (n,), generator=g)        # repeats: the same image can sit in the queue
        expect = official_step(ref, embds, idx)
        got = ours.swap_first_view(torch.cat(embds), idx)
        assert torch.equal(got, torch.cat(expect)), step
        assert torch.equal(ours.embeddings, ref.queue) and torch.equal(ours.sample_indices, ref.queue_indices)
        assert (ours.ptr, ours.full) == (ref.ptr, ref.full), step
        swapped_steps += not torch.equal(got[:n], embds[0])
    assert ref.full and swapped_steps == 12 - 4   # full after 4 pushes of 6 into 20; swaps from step 4 on


def test_nearest_skips_the_query_image_itself():
    q = NNQueue(3, 2)
    q.push(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), torch.tensor([7, 8, 9]))
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.equal(q.nearest(x, torch.tensor([7, 5])), torch.tensor([[0.6, 0.8], [1.0, 0.0]]))


def test_model_swaps_view_one_only_in_training_with_indices():
    torch.manual_seed(0)
    m = SelfClassifierModel("resnet18", hidden=32, dim=8, classes=(5,), queue_len=8)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    idx = torch.arange(4)
    m.train()
    m(views, indices=idx)
    m(views, indices=idx + 4)
    assert m.nn_queue.full and m.nn_queue.ptr == 0
    ref = m.nn_queue.embeddings.clone()
    z = m.head.embed(m.features(views))                             # train mode: the same batch statistics
    expected = m.nn_queue.nearest(z[:4], idx)
    out = m(views, indices=idx)
    c = m.head.classifiers[0]
    assert torch.allclose(out[0][0], c(expected), atol=1e-6)        # view 1: its nearest neighbours' logits
    assert torch.allclose(out[0][1], c(z[4:]), atol=1e-6)           # view 2 untouched
    assert m.nn_queue.ptr == 4 and torch.allclose(m.nn_queue.embeddings[:4], z[:4])  # view 1 pushed, unswapped
    assert torch.equal(m.nn_queue.embeddings[4:], ref[4:])
    m.eval()
    m(views, indices=idx)
    assert m.nn_queue.ptr == 4                                      # evaluation neither swaps nor pushes


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["total"] for r in rows}


SC = ["method=self_classifier", "self_classifier.classes=[10]", "self_classifier.hidden_dim=32",
      "self_classifier.dim=8", "self_classifier.queue_len=40", "augment.num_local=0", "train.epochs=1"]


def test_resume_restores_the_queue_exactly(tiny_data, tmp_path):
    """7 steps of 16; the queue of 40 fills at step 3 (swaps from step 4), the run stops at step 5 and resumes."""
    train(tiny_config(tiny_data, tmp_path / "a", *SC))
    train(tiny_config(tiny_data, tmp_path / "b", *SC, "train.max_steps=5"))
    state = ckpt.load(tmp_path / "b" / "checkpoint.pt")
    assert state["model"]["nn_queue._extra_state"] == {"ptr": (5 * 16) % 40, "full": True}
    train(tiny_config(tiny_data, tmp_path / "b", *SC), resume="auto")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 8))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    final_a = ckpt.load(tmp_path / "a" / "checkpoint.pt")["model"]
    final_b = ckpt.load(tmp_path / "b" / "checkpoint.pt")["model"]
    assert torch.equal(final_a["nn_queue.embeddings"], final_b["nn_queue.embeddings"])


def _two_rank_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    steps = [(F.normalize(torch.randn(2, 4, 3, generator=g), dim=2), torch.arange(8).view(2, 4) + 8 * s)
             for s in range(4)]                            # per step: (rank, n, dim) embeddings, (rank, n) indices
    q = NNQueue(12, 3)
    outs = [q.swap_first_view(torch.cat([e[rank], e[rank]]), i[rank]) for e, i in steps]
    torch.save({"queue": q.embeddings, "ptr": q.ptr, "outs": outs, "steps": steps}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_keep_identical_queues_of_the_global_batch(tmp_path):
    """Each rank pushes the gathered view 1 of both ranks (rank order), as the official AllGather + push."""
    import torch.multiprocessing as mp
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["queue"], r1["queue"]) and r0["ptr"] == r1["ptr"] == (4 * 8) % 12
    ref = OfficialNNQueue(12, 3)                           # one process fed the gathered batches
    for s, (e, i) in enumerate(r0["steps"]):
        for rank, res in ((0, r0), (1, r1)):
            if ref.full:
                nn_, _ = ref.get_nn(e[rank], i[rank])
                assert torch.equal(res["outs"][s][:4], nn_), (s, rank)
        ref.push(torch.cat([e[0], e[1]]), torch.zeros(8), torch.cat([i[0], i[1]]))
    assert torch.equal(ref.queue, r0["queue"])
