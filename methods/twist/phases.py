"""TWIST's two phases as functions of the step and epoch, in one place: the TWIST objective until
`self_label.start_epoch`, then self-labeling. Gives the crop recipe of an epoch (harder crops while
self-labeling), the confidence quantile of a step (None while TWIST runs) and the momentum encoder's momentum.
The phase's own lr (warmup + cosine to `self_label.lr`) is part of `engine.optim.Schedule`."""
from __future__ import annotations

from methods.schedule import cosine


class Phases:
    """The TWIST phase (epochs < self_label.start_epoch) and the self-labeling phase after it, as functions of
    the step: the confidence quantile (None while TWIST runs) and the momentum-encoder momentum (cosine over the TWIST
    steps, held at its end value afterwards — never indexed past its end)."""

    def __init__(self, cfg, steps_per_epoch: int):
        twist = (cfg.self_label.start_epoch or cfg.train.epochs) * steps_per_epoch
        self.total = cfg.train.epochs * steps_per_epoch
        self.sl_start = twist if twist < self.total else None
        self.twist_steps = twist
        self.q = (cfg.self_label.quantile, cfg.self_label.quantile_end)
        self.m = (cfg.model.momentum_start, cfg.model.momentum_end)

    def self_labeling(self, step: int) -> bool:
        return self.sl_start is not None and step >= self.sl_start

    def quantile(self, step: int) -> float | None:
        if not self.self_labeling(step):
            return None
        return cosine(step - self.sl_start, self.total - self.sl_start, *self.q)

    def momentum(self, step: int) -> float:
        return cosine(min(step, self.twist_steps), self.twist_steps, *self.m)


def crop_spec(cfg, spec, epoch: int):
    """The epoch's multi-crop recipe: `spec`, with the phase's harder crop scales once self-labeling has begun."""
    if epoch < (cfg.self_label.start_epoch or cfg.train.epochs):
        return spec
    return spec.with_scales(cfg.self_label.global_scale, cfg.self_label.local_scale)
