"""TWIST's per-step state for the training step: the two phases (self-labeling quantile, teacher momentum) and
the momentum encoder (the official ViT recipes' EMA teacher)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from methods.twist.phases import Phases
from models.dist import copy_module


@dataclass
class TwistLossInputs:
    """What TWIST's loss takes besides the student's outputs at one step."""
    teacher: list[torch.Tensor] | None = None  # the momentum teacher's outputs on the global views
                                                # (model.momentum_encoder); None: no teacher
    quantile: float | None = None      # the self-labeling phase's confidence quantile; None: the TWIST phase


class MomentumTeacher:
    """EMA copy of the student (the official ViT recipes): it sees the global views; after every optimizer step
    its parameters move to m * teacher + (1 - m) * student. Buffers (BN statistics) stay its own."""

    def __init__(self, student: nn.Module, num_global: int = 2):
        self.student, self.num_global = student, num_global
        self.net = copy_module(student).requires_grad_(False)   # shares bunch BN's / SyncBN's process groups
        self.t_params = list(self.net.parameters())
        self.s_params = list(student.parameters())

    @torch.no_grad()
    def __call__(self, views: list[torch.Tensor]):
        return self.net(views[:self.num_global])

    @torch.no_grad()
    def update(self, m: float) -> None:
        torch._foreach_mul_(self.t_params, m)
        torch._foreach_add_(self.t_params, [p.detach() for p in self.s_params], alpha=1.0 - m)


class TwistHooks:
    """`methods.registry.StepHooks` for TWIST: the teacher's outputs on the global views and the phase's
    confidence quantile go into the loss; after each optimizer step the teacher moves towards the student."""

    def __init__(self, cfg, student: nn.Module, steps_per_epoch: int):
        self.phases = Phases(cfg, steps_per_epoch)
        self.teacher = MomentumTeacher(student) if cfg.model.momentum_encoder else None

    def loss_inputs(self, views: list[torch.Tensor], step: int) -> TwistLossInputs:
        teacher = self.teacher(views) if self.teacher is not None else None
        return TwistLossInputs(teacher, self.phases.quantile(step))

    def after_step(self, step: int) -> None:
        if self.teacher is not None:
            self.teacher.update(self.phases.momentum(step))

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.net.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None and "teacher" in state:
            self.teacher.net.load_state_dict(state["teacher"])
