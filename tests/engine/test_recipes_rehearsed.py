"""Every recipe in configs/ rehearsed (issue #20): 2 gloo processes on the CPU train it for a few steps at tiny
sizes, with its own structure kept — momentum encoder, bunch BN spanning ranks, local crops, the self-labeling
phase switching on mid-run, the Self-Classifier queue filling and then replacing view 1, SyncBN groups that
divide the world — and the run's outputs show that structure ran. A new recipe is rehearsed by being in configs/.

The overrides only shrink (`tiny_overrides`): image and head sizes, batch, epochs, backbone depth (`model.depth`),
local crop count; and the resolved config.yaml must differ from the recipe in those keys alone. What each rank
ran comes from tests/engine/rehearse_train.py: train.py's own `main`, watched (rank 0's log and checkpoint
cannot show rank 1).

`train.compile` stays as the recipe has it, with `train.compile_backend=eager`: dynamo traces the model under DDP
(its graphs, guards and breaks as on a GPU node) and runs the graphs eagerly (Inductor's CPU compile costs
minutes). Not rehearsed here: SyncBatchNorm in the backbone and head MLP, which engine/step.py converts only on CUDA (torch's SyncBatchNorm
rejects CPU tensors); on CPU those norms are per process, and the test uses one as its control. The SyncBN-group
recipe (self_classifier_rn50) is checked for a group that divides the world, not for a synchronised backbone.

Cost, measured on a 2-core CPU: 106 s of CPU for the 8 launches (~8 s each is torchrun's and the two workers'
imports), 78-95 s wall beside other jobs at load 2-4 (~60 s idle, judged from the CPU time); the w2 recipe costs
most (32M parameters at depth 1: 18 s).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import load_config, to_dict
from tools.demo_data import build_demo

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
BATCH = 2                  # per rank: bunch BN, SyncBN and queue sizes below follow it
EPOCHS = 2
STEPS_PER_EPOCH = 2        # the data's 10 training images: 5 per rank, 2 batches of 2 (drop_last)
STEPS = EPOCHS * STEPS_PER_EPOCH
WORLD = 2
GLOBAL, LOCAL = 32, 16     # px; a ViT/16 sees 2x2 patches and 1 patch: its dynamic image size in use
MAX_LOCAL = 2              # local crops kept where a recipe has any (its 6-12 cost time, not structure)
TIMEOUT_S = 240            # a launch takes 6-25 s (the w2 recipe the longest) on a 2-core CPU, idle or loaded
# The only keys a rehearsal may change: sizes, counts, lengths, where the data and the run live, the device, the
# logging cadence, and the compile backend (eager: a CPU inductor compile takes minutes). A structural key here
# would be a bug.
SHRINK_KEYS = {"data.path", "train.out_dir", "data.batch_size", "data.workers", "train.device", "train.epochs",
               "train.log_every", "train.compile_backend", "train.ckpt_every_epochs", "augment.global_size",
               "augment.local_size", "eval.resize", "eval.crop", "model.depth", "train.monitor_bank",
               "train.monitor_queries", "train.monitor_k", "augment.num_local", "model.head_hidden", "model.head_dim",
               "model.bunch_size", "model.sync_bn_group", "self_label.start_epoch", "self_classifier.classes",
               "self_classifier.hidden_dim", "self_classifier.dim", "self_classifier.queue_len"}


@pytest.fixture(scope="module")
def rehearsal_data(tmp_path_factory):
    """10 classes x 1 training image (and 1 validation image, for the demo's online monitor), 32 px."""
    out = tmp_path_factory.mktemp("rehearsal") / "data"
    build_demo(out, limit_per_class=1, val_per_class=1, size=32)
    return out


def tiny_overrides(cfg, data: Path, out: Path) -> dict:
    """The recipe `cfg` at tiny sizes: only sizes, counts and lengths change; each structural switch keeps its
    state (a recipe's bunch BN still spans ranks, its queue still fills mid-run, its self-labeling phase still
    starts mid-run, its 'no phase' stays no phase)."""
    vit = cfg.model.arch.startswith("vit")
    ov = {"data.path": str(data), "train.out_dir": str(out), "data.batch_size": BATCH, "data.workers": 0,
          "train.device": "cpu", "train.epochs": EPOCHS, "train.log_every": 1, "train.compile_backend": "eager",
          "train.ckpt_every_epochs": EPOCHS,          # one save at the end, not one per epoch
          "augment.global_size": GLOBAL, "augment.local_size": LOCAL, "eval.resize": GLOBAL, "eval.crop": GLOBAL,
          # 2 ViT blocks, not 1: timm spreads drop_path over the blocks from 0, so one block would drop nothing
          "model.depth": 2 if vit else 1,
          "train.monitor_bank": 10, "train.monitor_queries": 10, "train.monitor_k": 5}
    if cfg.augment.num_local:
        ov["augment.num_local"] = min(MAX_LOCAL, cfg.augment.num_local)
    if cfg.method == "twist":
        ov.update({"model.head_hidden": 32, "model.head_dim": 16})
    if cfg.model.head_bn == "bunch":   # the recipe's ranks per bunch (2 to 8), capped at the 2 there are (a bunch
        #                                must divide the world, as the official assertion): spans both ranks
        ov["model.bunch_size"] = min(cfg.model.bunch_size // cfg.data.batch_size, WORLD) * BATCH
    if cfg.model.sync_bn_group:        # the recipe's 22 does not divide 2 processes; 2 groups both ranks
        ov["model.sync_bn_group"] = WORLD
    start = cfg.self_label.start_epoch
    if 0 < start < cfg.train.epochs:
        ov["self_label.start_epoch"] = 1        # self-labeling from the first step of epoch 1: step 3 of 4
    elif start:
        ov["self_label.start_epoch"] = EPOCHS   # start = epochs (the ViT recipes): no phase, as in the recipe
    if cfg.method == "self_classifier":
        sc = cfg.self_classifier
        ov.update({"self_classifier.classes": [4 * 2 ** i for i in range(len(sc.classes))],
                   "self_classifier.hidden_dim": 32, "self_classifier.dim": 16})
        if sc.queue_len:   # two global batches: full after step 2, so steps 3 and 4 use its neighbours
            ov["self_classifier.queue_len"] = 2 * BATCH * WORLD
    return ov


def cli(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def rehearse(recipe: Path, data: Path, out: Path) -> tuple:
    cfg = load_config(recipe)
    ov = tiny_overrides(cfg, data, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1",   # 2 processes on 2 cores
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "tests/engine/rehearse_train.py", "--config", str(recipe), *(f"{k}={cli(v)}" for k, v in ov.items())]
    # its own session, so that a hang (a collective one rank never joins) ends with torchrun's workers too
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        pytest.fail(f"{recipe.name} on {WORLD} processes: no end after {TIMEOUT_S} s\n{stderr[-4000:]}")
    assert p.returncode == 0, f"{recipe.name} on {WORLD} processes:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return cfg, ov, stdout


def loss_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "total" in r]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_rehearsed_on_two_processes(recipe, rehearsal_data, tmp_path):
    out = tmp_path / "run"
    recipe_cfg, ov, stdout = rehearse(recipe, rehearsal_data, out)

    # The run's config is the recipe's but for the shrunk keys, and those keep the recipe's structure.
    resolved = load_config(out / "config.yaml")
    ran = flat(to_dict(resolved))
    changed = {k for k, v in flat(to_dict(recipe_cfg)).items() if ran[k] != v}
    assert set(ov) <= SHRINK_KEYS and changed <= set(ov), f"changed beyond the overrides: {changed - set(ov)}"
    r, m, sc = recipe_cfg, resolved.model, resolved.self_classifier
    assert (resolved.augment.num_local > 0) == (r.augment.num_local > 0)
    if m.head_bn == "bunch":   # the recipe's ranks per bunch, up to the 2 there are: more than one rank
        assert m.bunch_size // resolved.data.batch_size == min(r.model.bunch_size // r.data.batch_size, WORLD) > 1
    assert (m.sync_bn_group > 0) == (r.model.sync_bn_group > 0) and WORLD % max(m.sync_bn_group, 1) == 0
    assert len(sc.classes) == len(r.self_classifier.classes) and (sc.queue_len > 0) == (r.self_classifier.queue_len > 0)
    phase = 0 < resolved.self_label.start_epoch < resolved.train.epochs
    assert phase == (0 < r.self_label.start_epoch < r.train.epochs)
    assert json.loads((out / "env.json").read_text())["world_size"] == WORLD

    # Steps: every one logged once (rank 0), finite.
    rows = loss_rows(out)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(row["total"]) for row in rows), rows
    state = ckpt.load(out / "checkpoint.pt")
    assert state["global_step"] == STEPS
    if m.arch.startswith("vit"):   # still a ViT: its blocks (2 of them) behind a patch embedding
        assert "backbone.patch_embed.proj.weight" in state["model"] and "backbone.blocks.1.attn.qkv.weight" in \
            state["model"] and not any(k.startswith("backbone.blocks.2.") for k in state["model"])
    ranks = [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(WORLD)]
    assert [rec["rank"] for rec in ranks] == [0, 1] and all(rec["world"] == WORLD for rec in ranks)

    # Views: 2 globals and the local crops, on both ranks, every step; the ranks read different images.
    views = [(BATCH, 3, GLOBAL, GLOBAL)] * 2 + [(BATCH, 3, LOCAL, LOCAL)] * resolved.augment.num_local
    for rec in ranks:
        assert [s["shapes"] for s in rec["steps"]] == [views] * STEPS
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert not set(a["indices"]) & set(b["indices"])

    norms = [rec["norms"] for rec in ranks]
    # Control: on the CPU the head MLP's first BN is per process (SyncBatchNorm is CUDA-only), so its statistics
    # differ between ranks; the group norms below must agree where this one does not.
    assert all(n["head.mlp.1"]["span"] == 1 for n in norms)
    assert not torch.equal(norms[0]["head.mlp.1"]["running_mean"], norms[1]["head.mlp.1"]["running_mean"])

    if resolved.method == "twist":
        check_head_norm(resolved, norms)
        check_teacher(resolved, state, ranks)
        check_phases(resolved, rows, ranks, stdout)
    else:
        check_self_classifier(resolved, rows, state, ranks)

    if resolved.train.monitor_every_epochs:   # the demo's online kNN monitor measures at step 0 (rank 0)
        monitor = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if "monitor_knn_top1" in x]
        assert monitor and monitor[0]["step"] == 0 and "monitor_pixels_knn_top1" in monitor[0]
    (out / "checkpoint.pt").unlink()   # up to 0.26 GB (w2, ViT-B) per case; pytest keeps 3 sessions' tmp dirs


def check_head_norm(cfg, norms: list[dict]) -> None:
    """The head's last BN: over both ranks for bunch BN (equal statistics on both), else per process."""
    head = [n["head.norm"] for n in norms]
    if cfg.model.head_bn == "bunch":
        assert [h["type"] for h in head] == ["GroupBatchNorm1d"] * WORLD and [h["span"] for h in head] == [WORLD] * 2
        assert torch.equal(head[0]["running_mean"], head[1]["running_mean"])
        assert head[0]["running_mean"].abs().sum() > 0          # it did see batches
    elif cfg.model.head_bn == "bn":
        assert [h["type"] for h in head] == ["LocalBatchNorm1d"] * WORLD and [h["span"] for h in head] == [1] * 2
        assert not torch.equal(head[0]["running_mean"], head[1]["running_mean"])


def check_teacher(cfg, state: dict, ranks: list[dict]) -> None:
    """The momentum teacher: checkpointed, moved away from the student by its EMA, the same on both ranks, and
    its bunch BN reduces over the student's own process group (models.dist.copy_module)."""
    if not cfg.model.momentum_encoder:
        assert "teacher" not in state["step_state"] and all("teacher_sums" not in rec for rec in ranks)
        return
    # The EMA moves it after every optimizer step; from step 2 on (step 1's lr is 0) by more than rounding.
    for rec in ranks:
        seen = [s["teacher"] for s in rec["steps"][1:]] + [rec["teacher_sums"]]
        assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))
    teacher, student = state["step_state"]["teacher"], state["model"]
    params = [k for k, v in teacher.items() if v.is_floating_point() and "running_" not in k]
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in params)
    assert all(rec["teacher_to_student"] > 0 for rec in ranks)
    assert torch.equal(ranks[0]["teacher_sums"], ranks[1]["teacher_sums"])
    for rec in ranks:
        t, s = rec["teacher_norms"]["head.norm"], rec["norms"]["head.norm"]
        assert t["type"] == s["type"] and t["span"] == s["span"]
        if cfg.model.head_bn == "bunch":
            assert t["group"] == s["group"]                     # the same group object, not a copy
    if cfg.model.head_bn == "bunch":
        assert torch.equal(ranks[0]["teacher_norms"]["head.norm"]["running_mean"],
                           ranks[1]["teacher_norms"]["head.norm"]["running_mean"])


def check_phases(cfg, rows: list[dict], ranks: list[dict], stdout: str) -> None:
    """Self-labeling: its loss (ce, threshold) from the switch on and never before; the quantile on both ranks;
    harder crops; the phase's own lr warmup restarting from 0."""
    sl = cfg.self_label
    switch = sl.start_epoch * STEPS_PER_EPOCH if 0 < sl.start_epoch < cfg.train.epochs else STEPS
    assert [("ce" in row, "kl" in row) for row in rows] == [(False, True)] * switch + [(True, False)] * (STEPS - switch)
    for rec in ranks:
        q = [s["quantile"] for s in rec["steps"]]
        assert q[:switch] == [None] * switch and all(isinstance(x, float) for x in q[switch:])
    if switch == STEPS:
        assert "self-labeling phase" not in stdout
        return
    assert "epoch 1: self-labeling phase" in stdout
    assert ranks[0]["steps"][switch]["quantile"] == pytest.approx(sl.quantile)
    for rec in ranks:
        assert rec["scales"][0] == tuple(sl.global_scale) and rec["scales"][-1] == tuple(sl.local_scale)
    assert rows[switch - 1]["lr"] > 0 and rows[switch]["lr"] == 0.0
    assert all(math.isfinite(row["ce"]) and 0 <= row["threshold"] <= 1 for row in rows[switch:])


def check_self_classifier(cfg, rows: list[dict], state: dict, ranks: list[dict]) -> None:
    """Every classifier's loss logged; the nearest-neighbour queue, where the recipe has one, full after two
    global batches, then used (full when steps 3 and 4 begin), identical on both ranks and holding both ranks'
    view 1 of the last two steps."""
    n = len(cfg.self_classifier.classes)
    assert all({f"ce{k}" for k in range(n)} <= set(row) for row in rows)
    assert f"head.classifiers.{n - 1}.weight_v" in state["model"]
    if not cfg.self_classifier.queue_len:
        assert not any(k.startswith("nn_queue") for k in state["model"])
        assert all(s["queue_full"] is None and "queue_swapped" not in s for rec in ranks for s in rec["steps"])
        return
    full_after = cfg.self_classifier.queue_len // (BATCH * WORLD)
    queues = [rec["queue"] for rec in ranks]
    for rec in ranks:
        used = [False] * full_after + [True] * (STEPS - full_after)
        assert [(s["queue_full"], s["queue_swapped"]) for s in rec["steps"]] == list(zip(used, used))
    assert all(q["full"] and q["ptr"] == STEPS * BATCH * WORLD % cfg.self_classifier.queue_len for q in queues)
    assert torch.equal(queues[0]["embeddings"], queues[1]["embeddings"])
    assert torch.equal(queues[0]["indices"], queues[1]["indices"])
    last = {i for rec in ranks for s in rec["steps"][-full_after:] for i in s["indices"]}
    assert set(queues[0]["indices"].tolist()) == last and len(last) == cfg.self_classifier.queue_len
    assert torch.equal(state["model"]["nn_queue.embeddings"], queues[0]["embeddings"])
