"""Recipes and protocols against transcriptions of the official code: bytedance/TWIST (README commands, train.py,
utils.py) and elad-amrani/self-classifier (scripts/train_800ep.sh, src/utils.py, src/cls_eval.py, apex)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from engine.config import ConfigError, load_config
from engine.config_schema import decays_all_params
from evaluation.official import linear_hparams, semi_hparams
from evaluation.protocols import knn_defaults
from evaluation.metrics import hungarian_accuracy
from engine.optim import Schedule, build_optimizer, split_decay_groups
from models.dist import bunch_groups
from methods.twist.head import ProjectionHead

# TWIST train.py defaults overridden by each README command (only the keys this project maps).
TWIST_DEFAULTS = dict(local_crops_number=12, batch_size=128, bunch_size=256, epochs=850, mme_epochs=800, lr=0.5,
                      dim=4096, hid_dim=4096, act="relu", lam1=0.0, lam2=1.0, optim="lars", clip_norm=0.0,
                      weight_decay=1.5e-6, weight_decay_end=1.5e-6, drop_path=0.0, use_momentum_encoder=0)
README = {
    "configs/rn50_multicrop.yaml": {},
    "configs/rn50w2_multicrop.yaml": dict(backbone="resnet50w2", batch_size=60, bunch_size=240, epochs=250,
                                          mme_epochs=200),
    "configs/rn50_2view.yaml": dict(aug="barlow", batch_size=256, dim=32768, epochs=800),
    "configs/vit_small.yaml": dict(backbone="vit_s", batch_size=64, bunch_size=256, clip_norm=3.0, epochs=300,
                                   mme_epochs=300, lam1=-0.6, lam2=1.0, act="gelu", local_crops_number=6, lr=0.0003,
                                   optim="admw", use_momentum_encoder=1, weight_decay=0.06, weight_decay_end=0.12),
    "configs/vit_base.yaml": dict(backbone="vit_b", batch_size=32, bunch_size=256, clip_norm=3.0, epochs=300,
                                  mme_epochs=300, lam1=-0.6, lam2=1.0, act="gelu", local_crops_number=10,
                                  lr=0.00075, optim="admw", use_momentum_encoder=1, weight_decay=0.06,
                                  weight_decay_end=0.06, drop_path=0.1),
}


@pytest.mark.parametrize("path", sorted(README))
def test_twist_recipes_are_the_official_commands(path):
    a = {**TWIST_DEFAULTS, **README[path]}
    cfg = load_config(path)
    m, o = cfg.model, cfg.optim
    local = 0 if a.get("aug") == "barlow" else a["local_crops_number"]     # --aug barlow: two views only
    got = dict(local=cfg.augment.num_local, batch=cfg.data.batch_size, epochs=cfg.train.epochs,
               mme=cfg.self_label.start_epoch or cfg.train.epochs, lr=o.lr, dim=m.head_dim, hid=m.head_hidden,
               act=m.head_act, lam=(cfg.loss.lam1, cfg.loss.lam2), optim=o.name, clip=o.clip_grad,
               wd=(o.weight_decay, o.weight_decay_end), drop_path=m.drop_path, ema=int(m.momentum_encoder),
               final=o.min_lr_ratio, warmup=o.warmup_epochs, start=o.warmup_start_ratio)
    want = dict(local=local, batch=a["batch_size"], epochs=a["epochs"], mme=min(a["mme_epochs"], a["epochs"]),
                lr=a["lr"], dim=a["dim"], hid=a["hid_dim"], act=a["act"], lam=(a["lam1"], a["lam2"]),
                optim={"admw": "adamw"}.get(a["optim"], a["optim"]), clip=a["clip_norm"],
                wd=(a["weight_decay"], a["weight_decay_end"]), drop_path=a["drop_path"],
                ema=a["use_momentum_encoder"], final=0.001, warmup=10, start=0.0)  # main(): 10 warmup epochs > 50
    assert got == want
    if m.head_bn == "bunch":
        assert m.bunch_size == a["bunch_size"]


def official_adjust_learning_rate(lr, lr_sl, warmup_epochs, mme_epochs, sl_warmup_epochs, epochs, n, step):
    """TWIST utils.adjust_learning_rate (lr and lr_sl already scaled by the global batch), group 0's lr."""
    warmup_steps, mme_steps, sl_warmupsteps, max_steps = warmup_epochs * n, mme_epochs * n, sl_warmup_epochs * n, \
        epochs * n
    base_lr = 1.0
    if step < warmup_steps:
        return base_lr * step / warmup_steps * lr
    elif step < mme_steps:
        step -= warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * step / (mme_steps - warmup_steps)))
        return (base_lr * q + base_lr * 0.001 * (1 - q)) * lr
    elif step < (mme_steps + sl_warmupsteps):
        return base_lr * (step - mme_steps) / sl_warmupsteps * lr_sl
    step -= (mme_steps + sl_warmupsteps)
    max_steps -= (mme_steps + sl_warmupsteps)
    q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    return (base_lr * q + base_lr * 0.001 * (1 - q)) * lr_sl


@pytest.mark.parametrize("path", ["configs/rn50_2view.yaml", "configs/rn50_multicrop.yaml"])
def test_lr_schedule_after_warmup_is_the_official_one(path):
    cfg = load_config(path)
    n, world = 50, 8                       # steps per epoch (shortened) and GPUs
    gb = cfg.data.batch_size * world
    mme = cfg.self_label.start_epoch or cfg.train.epochs
    s = Schedule(cfg.optim, n, cfg.train.epochs, gb, mme)
    sl_warm = int(cfg.self_label.warmup_epochs)
    warm = [(0, int(cfg.optim.warmup_epochs) * n)] + ([(mme * n, (mme + sl_warm) * n)] if mme < cfg.train.epochs
                                                       else [])
    for step in range(0, cfg.train.epochs * n, 7):
        if any(a <= step < b for a, b in warm):    # the warmups' first step is another fix's concern
            continue
        ref = official_adjust_learning_rate(cfg.optim.lr * gb / 256, cfg.self_label.lr * gb / 256,
                                            int(cfg.optim.warmup_epochs), mme, sl_warm, cfg.train.epochs, n, step)
        assert s.lr(step) == pytest.approx(ref, rel=1e-9), step


def official_twist_param_groups(model):
    """TWIST train.py: names of (weights, biases) — weight decay and LARS only on the first."""
    param_weights, param_biases = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = ['pos_embed', 'cls_token', 'dist_token']
        if len(param.shape) == 1 or name.endswith(".bias") or sum([sk in name for sk in skip]):
            param_biases.append(param)
        else:
            param_weights.append(param)
    return param_weights, param_biases


def test_vit_position_embedding_and_class_token_get_no_weight_decay():
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    decay, no_decay = split_decay_groups(vit)
    ref_w, ref_b = official_twist_param_groups(vit)
    assert [id(p) for p in decay] == [id(p) for p in ref_w] and [id(p) for p in no_decay] == [id(p) for p in ref_b]
    assert any(p is vit.pos_embed for p in no_decay) and any(p is vit.cls_token for p in no_decay)


def test_self_classifier_decays_every_parameter_as_officially():
    """self-classifier src/utils.get_params_groups without --no-bias-wd / --bbone-wd: model.parameters()."""
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    sc = load_config("configs/self_classifier_rn50.yaml")
    assert decays_all_params(sc) and not decays_all_params(load_config("configs/rn50_multicrop.yaml"))
    opt = build_optimizer(sc.optim, net, "self_classifier", decay_all=decays_all_params(sc))
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in net.parameters()]
    assert opt.param_groups[0]["weight_decay"] == 1e-6 and not opt.param_groups[0]["lars_exclude"]
    assert decays_all_params(load_config("configs/demo.yaml", ["optim.decay_params=all"]))


def official_vit_init(head):
    """TWIST train.py ProjectionHead._vit_init_weights applied with self.apply after construction."""
    def init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)   # utils.trunc_normal_: the same inverse-CDF algorithm
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
    head.apply(init)
    return head


def test_vit_head_initialisation_is_the_official_one():
    torch.manual_seed(3)
    ref = official_vit_init(ProjectionHead(48, 64, 32))
    torch.manual_seed(3)
    ours = ProjectionHead(48, 64, 32, trunc_init=True)
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k
    from methods.twist.model import TwistModel
    vit = TwistModel("vit_small", head_hidden=64, head_dim=32)
    assert all(m.bias.abs().max() == 0 and abs(m.weight.std().item() - 0.02) < 0.002
               for m in vit.head.modules() if isinstance(m, nn.Linear))
    rn = TwistModel("resnet18", head_hidden=64, head_dim=32)
    assert rn.head.last_linear.bias.abs().max() > 0     # ResNet: nn.Linear's default init, as officially


def test_bunch_size_must_be_a_multiple_of_the_batch():
    with pytest.raises(ConfigError, match="model.bunch_size': 256 is not a multiple of data.batch_size=96"):
        load_config("configs/rn50_multicrop.yaml", ["data.batch_size=96"])


def apex_syncbn_groups(world_size, group_size):
    """apex.parallel.create_syncbn_process_group: the rank lists of the groups it creates."""
    assert world_size >= group_size and world_size % group_size == 0
    return [list(range(g * group_size, (g + 1) * group_size)) for g in range(world_size // group_size)]


def test_self_classifier_recipe_is_train_800ep_sh():
    cfg = load_config("configs/self_classifier_rn50.yaml")
    world = 11 * 6                                     # --nodes=11 --ntasks-per-node=6
    assert cfg.data.batch_size == int(372 / 6)         # -b 372 divided by the GPUs per node
    assert cfg.model.sync_bn_group == 22 and bunch_groups(world, 22) == apex_syncbn_groups(world, 22)
    s = Schedule(cfg.optim, 100, cfg.train.epochs, cfg.data.batch_size * world)
    assert s.peak == pytest.approx(3.2) and s.final == pytest.approx(0.0032) and s.start == pytest.approx(0.2)
    sc = cfg.self_classifier
    assert (sc.queue_len, sc.classes, sc.dim, sc.hidden_dim, sc.mlp_layers) == (262144, (1000, 2000, 4000, 8000),
                                                                                128, 4096, 2)
    assert (cfg.augment.num_local, cfg.optim.weight_decay, cfg.optim.name) == (6, 1e-6, "lars")


def test_evaluation_defaults_are_the_official_commands():
    lin = linear_hparams()
    assert lin.lr_classifier * 1024 / 256 == pytest.approx(0.2)    # --lr-classifier 0.2 --batch-size 1024
    for pct, (epochs, lrb) in {1: (20, 0.04), 10: (20, 0.02), 100: (30, 0.01)}.items():
        hp = semi_hparams(pct)                                     # README commands, batch 256 (default)
        assert (hp.epochs, hp.lr_backbone, hp.lr_classifier, hp.weight_decay, hp.sync_bn) == (epochs, lrb, 0.2,
                                                                                               0.0, False)
    assert knn_defaults("self_classifier") == ((10, 20, 100, 200), 0.1)   # scripts/knn_eval.sh, knn_eval.py
    assert knn_defaults("twist") == ((20, 200), 0.07) and knn_defaults("twist", (5,), 0.2) == ((5,), 0.2)


def official_sc_accuracy(targets, preds):
    """self-classifier src/cls_eval.py compute_metrics: accuracy (no superclass mapping)."""
    num_classes = max(targets.max(), preds.max()) + 1
    count_matrix = np.zeros((num_classes, num_classes), dtype=np.int32)
    for ii in range(preds.shape[0]):
        count_matrix[preds[ii], targets[ii]] += 1
    reassignment = np.dstack(linear_sum_assignment(count_matrix.max() - count_matrix))[0]
    if len(np.unique(preds)) > len(np.unique(targets)):
        for cls_idx in np.unique(preds):
            if reassignment[cls_idx, 1] not in targets:
                reassignment[cls_idx, 1] = count_matrix[cls_idx].argmax()
    return count_matrix[reassignment[:, 0], reassignment[:, 1]].sum().astype(np.float32) / preds.shape[0]


def official_twist_accuracy(targets, preds):
    """TWIST evaluate_cluster.hungarian_evaluate / _hungarian_match (k x k over ids < number of classes)."""
    k = len(np.unique(targets))
    num_correct = np.array([[((preds == c1) & (targets == c2)).sum() for c2 in range(k)] for c1 in range(k)])
    rows, cols = linear_sum_assignment(len(targets) - num_correct)
    reordered = np.full_like(preds, -1)
    for p, t in zip(rows, cols):
        reordered[preds == p] = t
    return (reordered == targets).mean()


@pytest.mark.parametrize("seed", range(4))
def test_cluster_accuracy_matches_both_official_evaluations(seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 10, 400)
    over = targets * 3 + rng.integers(0, 3, 400)                        # 30 clusters, 3 per class ...
    noisy = np.where(rng.random(400) < 0.3, rng.integers(0, 30, 400), over)   # ... 30% of samples anywhere
    assert hungarian_accuracy(noisy, targets, "best") == pytest.approx(official_sc_accuracy(targets, noisy))
    assert hungarian_accuracy(noisy, targets, "wrong") < hungarian_accuracy(noisy, targets, "best")
    perm = rng.permutation(10)[np.where(rng.random(400) < 0.7, targets, rng.integers(0, 10, 400))]
    assert hungarian_accuracy(perm, targets, "wrong") == pytest.approx(official_twist_accuracy(targets, perm))
    assert hungarian_accuracy(perm, targets, "best") == pytest.approx(official_twist_accuracy(targets, perm))


def test_sync_bn_group_option():
    from models.dist import sync_bn_process_group
    assert sync_bn_process_group(0) is None                         # all ranks (the TWIST recipes)
    with pytest.raises(ValueError, match="model.sync_bn_group=2 ranks must divide the world size 1"):
        sync_bn_process_group(2)
    from evaluation.finetune import finetune_model_config
    cfg = load_config("configs/self_classifier_rn50.yaml")
    assert not finetune_model_config(cfg, semi_hparams(10)).sync_bn   # official fine-tuning: BN per process
