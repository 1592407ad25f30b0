"""train.py under observation, for tests/engine/test_recipes_rehearsed.py. Run it as train.py (same command line,
same `train.main`) under torchrun; it only watches: each rank, after training, writes OUT_DIR/rank{R}.pt with
what that rank ran, which rank 0's checkpoint and log cannot show (the other rank's state):

- per step: the views' shapes, the dataset indices, the self-labeling quantile (None: TWIST objective), whether
  the Self-Classifier queue was full when the step began and whether its nearest neighbours replaced view 1's
  embeddings, and a fingerprint of the momentum teacher's parameters;
- per BatchNorm of the student and of the momentum teacher: its class, how many ranks its statistics span and its
  running mean;
- the teacher's final fingerprint and its distance to the student; the queue's contents; the crop scales of the
  last epoch's pipeline.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import train
from engine import checkpoint as ckpt
from engine.step import TrainStep
from engine.trainer import Run
from methods.self_classifier.nn_queue import NNQueue

STEPS: list[dict] = []


def _observed_step(original):
    def step(self, views, step, indices=None):
        student = ckpt.unwrap(self.model)
        queue = getattr(student, "nn_queue", None)
        phases = getattr(self.hooks, "phases", None)
        teacher = getattr(self.hooks, "teacher", None)
        STEPS.append({"shapes": [tuple(v.shape) for v in views],
                      "indices": None if indices is None else indices.tolist(),
                      "quantile": phases.quantile(step) if phases is not None else None,
                      "queue_full": None if queue is None else queue.full,
                      "teacher": None if teacher is None else _fingerprint(teacher.net.parameters())})
        return original(self, views, step, indices)
    return step


def _observed_swap(original):
    def swap(self, z, indices):
        out = original(self, z, indices)
        STEPS[-1]["queue_swapped"] = not torch.equal(out[:indices.shape[0]], z[:indices.shape[0]])
        return out
    return swap


def _fingerprint(params) -> torch.Tensor:
    """Per-parameter sums (float64): equal networks give equal fingerprints; a moved parameter changes its sum."""
    return torch.stack([p.detach().double().sum() for p in params])


def _span(m: nn.Module) -> int:
    """Ranks whose samples the norm's training statistics cover."""
    group = getattr(m, "group", None) or getattr(m, "process_group", None)
    if isinstance(m, nn.SyncBatchNorm) or group is not None:
        return dist.get_world_size(group)
    return 1


def norms(model: nn.Module) -> dict:
    return {name: {"type": type(m).__name__, "span": _span(m), "running_mean": m.running_mean.clone(),
                   "group": id(getattr(m, "group", None))}
            for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def record(run: Run) -> dict:
    student = ckpt.unwrap(run.net)
    rec = {"steps": STEPS, "norms": norms(student), "rank": run.info.rank, "world": run.info.world_size,
           "scales": [g.scale for g in run.pipe_spec.groups]}
    teacher = getattr(run.step_fn.hooks, "teacher", None)
    if teacher is not None:
        rec["teacher_norms"] = norms(teacher.net)
        rec["teacher_sums"] = _fingerprint(teacher.net.parameters())
        with torch.no_grad():
            rec["teacher_to_student"] = sum((t.double() - s.double()).pow(2).sum()
                                            for t, s in zip(teacher.net.parameters(), student.parameters())).sqrt()
    queue = getattr(student, "nn_queue", None)
    if queue is not None:
        rec["queue"] = {"full": queue.full, "ptr": queue.ptr, "indices": queue.sample_indices.clone(),
                        "embeddings": queue.embeddings.clone()}
    return rec


def main() -> int:
    TrainStep.__call__ = _observed_step(TrainStep.__call__)
    NNQueue.swap_first_view = _observed_swap(NNQueue.swap_first_view)
    fit = Run.fit

    def observed_fit(self):
        out = fit(self)
        torch.save(record(self), self.out / f"rank{self.info.rank}.pt")   # before train.main ends the group
        return out

    Run.fit = observed_fit
    return train.main()


if __name__ == "__main__":
    sys.exit(main())
