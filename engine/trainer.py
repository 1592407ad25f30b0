"""The training loop behind train.py: data, model, optimizer, schedule, checkpoints, logs."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.config import Config, config_from_dict, save_config, to_dict
from engine.config_schema import decays_all_params, twist_epochs
from engine.distributed import DistInfo, init_distributed
from engine.faults import FaultGuard
from engine.runlog import JsonlLogger, Throughput, console, progress, write_env
from engine.optim import Schedule, build_optimizer
from methods.twist.phases import crop_spec
from engine.precision import Precision, resolve_precision
from engine.step import TrainStep, prepare_model
from models.backbones import backbone_state_dict
from methods.registry import build_model, loss_fn, step_hooks
from pipelines import build_pipeline
from pipelines.filecheck import BadFileLog
from pipelines.spec import MultiCropSpec


def build_training(cfg: Config, info: DistInfo, steps_per_epoch: int, precision: Precision):
    """Model, wrapped network, optimizer and training step — shared by the trainer and tools/profiler.py."""
    model = build_model(cfg)
    optimizer = build_optimizer(cfg.optim, model, cfg.method, decays_all_params(cfg))
    schedule = Schedule(cfg.optim, steps_per_epoch, cfg.train.epochs, cfg.data.batch_size * info.world_size,
                        twist_epochs(cfg), cfg.self_label)
    net = prepare_model(model, cfg.train, cfg.model, info.device, info.distributed)
    step_fn = TrainStep(net, optimizer, schedule, loss_fn(cfg), cfg.optim, precision, info.device,
                        cfg.train.skip_nonfinite, step_hooks(cfg, ckpt.unwrap(net), steps_per_epoch))
    return model, net, optimizer, step_fn


class Run:
    """Everything one training process holds. `fit()` trains until the configured end or `train.max_steps`."""

    def __init__(self, cfg: Config, info: DistInfo, resume: str | None = None):
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.train.out_dir)
        torch.manual_seed(cfg.train.seed + info.rank)
        self.precision = resolve_precision(cfg.train.precision, info.device)
        self.pipe = self._pipeline(0)
        self.steps_per_epoch = len(self.pipe)
        if self.steps_per_epoch <= 0:
            raise ValueError(f"data.path '{cfg.data.path}': fewer samples per process than data.batch_size="
                             f"{cfg.data.batch_size}; lower the batch size or add images")
        self.monitor = None
        if info.is_main and cfg.train.monitor_every_epochs:
            from engine.monitor import KnnMonitor
            self.monitor = KnnMonitor(cfg, info.device)   # lists its subset now: a bad path fails at the start
        self.model, self.net, self.optimizer, self.step_fn = build_training(cfg, info, self.steps_per_epoch,
                                                                           self.precision)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.guard = FaultGuard(info.device, info.distributed)  # signal handlers only while fit() runs
        self.last_saved: str | None = None
        self.bad_files = BadFileLog(announce=info.world_size == 1)  # unreadable images met (each replaced):
        #                                    named once (rank 0 under DDP), logged as a count over all ranks
        path = ckpt.resolve_resume(resume, self.out)
        if path is not None:
            self._load(path)
        self.log = JsonlLogger(self.out / "log.jsonl" if info.is_main else None,
                               self.out / "tensorboard" if info.is_main and cfg.train.tensorboard else None)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            write_env(self.out / "env.json", info.world_size, info.device)

    def _pipeline(self, epoch: int):
        self.pipe_spec = self._phase_spec(epoch)
        return build_pipeline(self.cfg, self.cfg.data.train_split, self.info.rank, self.info.world_size,
                              self.info.device, dtype=self.precision.input_dtype, spec=self.pipe_spec)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict:
        model = ckpt.unwrap(self.net)
        return {"model": model.state_dict(), "backbone": backbone_state_dict(model.backbone),
                "optimizer": self.optimizer.state_dict(), "step_state": self.step_fn.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "config": to_dict(self.cfg), "world_size": self.info.world_size, "rng_cpu": torch.get_rng_state(),
                "format": "fasttwist-1"}

    def save(self, keep: bool = False) -> Path | None:
        """Write the checkpoint (rank 0), never from a model that has seen a non-finite loss. `keep`: also keep
        a copy named after the epoch (`checkpoint_e0100.pt`), pruned to the newest `train.keep_last`."""
        self.guard.check(self.global_step, self.last_saved)
        if not self.info.is_main:
            return None
        path = ckpt.save_atomic(self.state(), self.out / ckpt.CKPT_NAME)
        self.last_saved = f"{path} (step {self.global_step})"
        if keep:
            ckpt.keep_copy(path, self.out / ckpt.kept_name(self.epoch))
            ckpt.prune_kept(self.out, self.cfg.train.keep_last)
        return path

    def _epoch_end(self) -> None:
        """Checkpoint (rolling, and kept every `keep_every_epochs`) and the online monitor, as due."""
        t, e = self.cfg.train, self.epoch
        keep = bool(t.keep_every_epochs) and e % t.keep_every_epochs == 0
        if keep or e % t.ckpt_every_epochs == 0 or e == t.epochs:
            self.save(keep)
        if self.monitor is not None and e % t.monitor_every_epochs == 0:
            self._monitor()

    def _monitor(self) -> None:
        """One online kNN measurement, logged; at step 0 (initialisation) with the raw-pixel reference too."""
        rec = self.monitor(ckpt.unwrap(self.net), pixels=self.global_step == 0)
        self.net.train()
        self.log.log({**rec, "step": self.global_step, "epoch": self.epoch, "time": time.time()})
        pixels = (f", raw pixels {rec['monitor_pixels_knn_top1']:.2f}%" if "monitor_pixels_knn_top1" in rec
                  else "")
        console.print(f"epoch {self.epoch}: monitor kNN top-1 {rec['monitor_knn_top1']:.2f}%{pixels} "
                      f"({self.monitor.sizes[1]} queries, bank {self.monitor.sizes[0]})")

    def _load(self, path: Path) -> None:
        state = ckpt.load(path)
        ckpt.unwrap(self.net).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_fn.load_state_dict(state.get("step_state", {}))
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        torch.set_rng_state(state["rng_cpu"])
        self.last_saved = f"{path} (step {self.global_step})"
        if self.info.is_main:
            console.print(f"resumed from {path} at epoch {self.epoch}, step {self.global_step}")
            change = schedule_change(state, self.cfg, self.info.world_size, self.step_fn.schedule)
            if change:
                console.print(change)

    def _phase_spec(self, epoch: int) -> MultiCropSpec:
        """The epoch's multi-crop recipe (harder crops once self-labeling has begun: methods/twist/phases.py)."""
        return crop_spec(self.cfg, MultiCropSpec.from_config(self.cfg.augment), epoch)

    # -- loop ----------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        total_steps = self.steps_per_epoch * cfg.train.epochs
        limit = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else total_steps
        last: dict = {}
        meter = Throughput()
        if self.monitor is not None and self.global_step == 0:
            self._monitor()                  # the network at initialisation, and the raw pixels
        self.net.train()
        self.guard.install()
        try:
            with progress(info.is_main) as bar:
                task = bar.add_task("train", total=limit, completed=self.global_step, info="")
                while self.epoch < cfg.train.epochs and self.global_step < limit:
                    if self._phase_spec(self.epoch) != self.pipe_spec:  # entering (or resuming in) self-labeling
                        self.pipe = self._pipeline(self.epoch)
                        if info.is_main:
                            console.print(f"epoch {self.epoch}: self-labeling phase, crop scales "
                                          f"{cfg.self_label.global_scale} / {cfg.self_label.local_scale}")
                    self.pipe.set_epoch(self.epoch, self.step_in_epoch)
                    for batch in self.pipe:
                        if batch.skipped:
                            self.bad_files.add(batch.skipped)
                        losses = self.step_fn(batch.views, self.global_step, batch.indices)
                        if "skipped" not in losses:
                            self.guard.track(losses["total"])
                        self.global_step += 1
                        self.step_in_epoch += 1
                        meter.add(len(batch) * info.world_size)
                        bar.advance(task)
                        log_step = self.global_step % cfg.train.log_every == 0 or self.global_step == limit
                        if log_step:
                            self.guard.check(self.global_step, self.last_saved)
                            last = self._log(losses, meter.rate())
                            bar.update(task, info=f"epoch {self.epoch} loss {last['total']:.4f} "
                                                  f"{last['samples_per_s']:.0f} samples/s")
                        if cfg.train.ckpt_every_steps and self.global_step % cfg.train.ckpt_every_steps == 0:
                            self.save()
                        if self.guard.should_stop(sync_ranks=log_step):
                            break
                        if self.global_step >= limit:
                            break
                    if self.guard.signal_name:
                        break
                    if self.step_in_epoch >= self.steps_per_epoch:
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                        self._epoch_end()
            path = self.save()
        finally:
            self.guard.restore()  # also after an exception: forked workers must not inherit our handlers
            self.log.close()
        if self.guard.signal_name and info.is_main:
            console.print(f"stopped by {self.guard.signal_name} at step {self.global_step}; checkpoint {path} "
                          f"(continue with --resume auto)")
        return {**last, "checkpoint": str(path) if path else None, "global_step": self.global_step,
                "stopped_by": self.guard.signal_name, "is_main": info.is_main}

    def _log(self, losses: dict, rate: float) -> dict:
        rec = {k: float(v) for k, v in losses.items()}  # the only host sync, at log steps
        rec.update(step=self.global_step, epoch=self.epoch, samples_per_s=rate, time=time.time(),
                   skipped_files=self.bad_files.total(self.info.device))
        if self.info.device.type == "cuda":
            rec["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.info.device) / 2 ** 30
        self.log.log(rec)
        return rec


# What the lr schedule is computed from: changing one on resume changes the lr from the next step on.
SCHEDULE_KEYS = ("train.epochs", "data.batch_size", "optim.lr", "optim.warmup_epochs", "optim.min_lr_ratio",
                 "optim.warmup_start_ratio", "self_label.start_epoch", "self_label.lr", "self_label.warmup_epochs")


def schedule_change(state: dict, cfg: Config, world_size: int, schedule: Schedule) -> str:
    """One line when a resumed run's schedule differs from the checkpoint's: what changed, the lr the last step
    used (the optimizer's own record) and the lr of the next step; "" when nothing changed."""
    old, new = config_from_dict(state["config"]), cfg
    changes = []
    for key in SCHEDULE_KEYS:
        sec, name = key.split(".")
        a, b = getattr(getattr(old, sec), name), getattr(getattr(new, sec), name)
        if a != b:
            changes.append(f"{key} {a} -> {b}")
    old_world = state.get("world_size", world_size)   # checkpoints before this field: assume the same world
    if old_world != world_size:
        changes.append(f"processes {old_world} -> {world_size} (global batch {old.data.batch_size * old_world} -> "
                       f"{new.data.batch_size * world_size})")
    if not changes:
        return ""
    step = state["global_step"]
    was, nxt = state["optimizer"]["param_groups"][0]["lr"], schedule.lr(step)
    why = ("the schedule is recomputed for the new settings" if abs(nxt - was) <= 0.5 * max(abs(was), 1e-12)
           else "a jump: the warmup/cosine is recomputed for the new settings, not continued")
    return f"resume: {'; '.join(changes)}; lr at step {step} was {was:.3g}, next step {nxt:.3g} ({why})"


def train(cfg: Config, resume: str | None = None) -> dict:
    info = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min, cfg.train.threads)
    return Run(cfg, info, resume).fit()
