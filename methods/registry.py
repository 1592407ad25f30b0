"""The training methods, selected in one place by `cfg.method`.

A method builds its model (a `MultiCropModel`: shared backbone and multi-crop forward, its own head) from the
config, keeps its per-step state in `StepHooks` (TWIST: the momentum teacher and the self-labeling phase), and
turns the model's outputs plus the hooks' loss inputs into a loss dict whose key 'total' is minimised; the other
keys are logged. Pipelines, optimiser, AMP, DDP, checkpoints and evaluation are shared. The config is duck-typed
(models never import the engine).

    method = get_method(cfg.method)
    model = method.build(cfg)
    hooks = method.hooks(cfg, model, steps_per_epoch)
    losses = method.loss(model(views), cfg, hooks.loss_inputs(views, step))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from methods.twist.loss import twist_loss
from methods.twist.self_label import self_label_loss, twist_teacher_loss
from models.multicrop import MultiCropModel
from methods.self_classifier.model import SelfClassifierModel
from methods.self_classifier.loss import self_classifier_loss
from methods.twist.hooks import TwistHooks, TwistLossInputs
from methods.twist.model import TwistModel


class StepHooks:
    """A method's per-step state, called by the training step (engine/step.py): extra inputs to the loss (computed
    under autocast, after the model's forward), work after each optimizer step, and state for checkpoints. The
    default has none (Self-Classifier)."""

    def loss_inputs(self, views, step: int) -> Any:
        """What the method's loss takes besides the model's outputs (a method's own typed object); None: nothing."""
        return None

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[Any], MultiCropModel]          # cfg -> model
    loss: Callable[..., dict]                        # (model outputs, cfg, the hooks' loss inputs) -> {'total': ...}
    hooks: Callable[..., StepHooks] = lambda cfg, student, steps_per_epoch: StepHooks()


def _twist_loss(outputs, cfg, inputs: TwistLossInputs | None = None) -> dict:
    """TWIST; with a momentum encoder's outputs on the globals (`inputs.teacher`) the teacher-student form; in the
    self-labeling phase (`inputs.quantile` given by the phases) the confidence-thresholded cross-entropy."""
    lc = cfg.loss
    teacher, quantile = (inputs.teacher, inputs.quantile) if inputs is not None else (None, None)
    if quantile is not None:
        return self_label_loss(outputs, quantile, lc.tau, lc.eps, anchors=teacher)
    if teacher is not None:
        return twist_teacher_loss(teacher, outputs, lc.lam1, lc.lam2, lc.tau, lc.eps)
    return twist_loss(outputs, lc.lam1, lc.lam2, lc.tau, lc.eps)


def _self_classifier_loss(outputs, cfg, inputs: None = None) -> dict:
    sc = cfg.self_classifier
    return self_classifier_loss(outputs, sc.row_tau, sc.col_tau, sc.eps)


METHODS: dict[str, Method] = {
    "twist": Method("twist", lambda cfg: TwistModel.from_config(cfg.model, cfg.data.batch_size), _twist_loss,
                    lambda cfg, student, steps_per_epoch: TwistHooks(cfg, student, steps_per_epoch)),
    "self_classifier": Method("self_classifier", SelfClassifierModel.from_config, _self_classifier_loss),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method '{name}' is not one of {', '.join(METHODS)}")
    return METHODS[name]


def build_model(cfg) -> MultiCropModel:
    return get_method(cfg.method).build(cfg)


def step_hooks(cfg, student, steps_per_epoch: int) -> StepHooks:
    """The configured method's per-step hooks around `student` (the unwrapped model)."""
    return get_method(cfg.method).hooks(cfg, student, steps_per_epoch)


def loss_fn(cfg) -> Callable[..., dict]:
    """(outputs, the hooks' loss inputs = None) -> loss dict, for the configured method."""
    loss = get_method(cfg.method).loss
    return lambda outputs, inputs=None: loss(outputs, cfg, inputs)
