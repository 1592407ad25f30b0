"""evaluate.py end to end on one tiny trained checkpoint (tests/conftest.py: trained_ckpt)."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision

import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_eval(tmp_path, *args, name="eval.json"):
    out = tmp_path / name
    assert evaluate.main([*args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def one_line_error(capsys, *args) -> str:
    assert evaluate.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: ") and "\n" not in err, err
    return err


def test_knn_and_cluster_cli(trained_ckpt, tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "evaluate.py", "knn,cluster", "--checkpoint", str(trained_ckpt), "--out",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    m = res["metrics"]
    for key in ("knn_top1_k20", "knn_top5_k20", "knn_top1_k200", "cluster_nmi", "cluster_ami", "cluster_ari",
                "cluster_acc", "cluster_clusters_used"):
        assert key in m
    assert 0 <= m["knn_top1_k20"] <= 100 and 0 <= m["cluster_nmi"] <= 1 and 1 <= m["cluster_clusters_used"] <= 16
    assert res["protocol"] == "knn,cluster" and len(res["checkpoint_sha256"]) == 16
    assert res["config"]["model"]["arch"] == "resnet18" and res["details"]["knn"]["bank_size"] == 120
    assert res["metrics"]["knn_top1_k20"] > 30.0                                # 10 classes: chance is 10%
    assert "knn_top1_k20" in r.stdout and "cluster_nmi" in r.stdout


def test_linear_trains_a_classifier_on_the_frozen_backbone(trained_ckpt, tmp_path):
    res = run_eval(tmp_path, "linear", "--checkpoint", str(trained_ckpt), "--epochs", "2")
    m, d = res["metrics"], res["details"]["linear"]
    assert {"linear_top1", "linear_top5", "linear_best_top1", "linear_best_top5"} <= set(m)
    assert m["linear_best_top1"] >= m["linear_top1"] and 0 <= m["linear_top5"] <= 100
    assert [r["epoch"] for r in d["history"]] == [1, 2]
    assert d["hparams"] == {"epochs": 2, "lr_classifier": 0.05, "lr_backbone": 0.0, "weight_decay": 0.0,
                            "momentum": 0.9, "eval_every": 1, "sync_bn": False, "bn": "train", "global_batch": 1024,
                            "optimizer": "sgd", "n_last_blocks": 1}
    assert res["official_protocol"] == "twist_resnet"
    # 120 training images < the official global batch 1024: one step of 120 an epoch, the lr scaled to it, and
    # constant within the epoch (cosine per epoch over 2 epochs: the peak, then half of it)
    assert not d["cached_features"] and d["global_batch"] == 120
    assert [r["lr"] for r in d["history"]] == pytest.approx([0.05 * 120 / 256, 0.05 * 120 / 256 / 2])


def test_cached_features_linear_and_sharded_knn_match_under_torchrun(trained_ckpt, tmp_path):
    """The cached-features probe learns (beats chance by far), and 2 gloo processes with half the batch each
    train the same classifier as one process (same global batches; DDP averages the gradients). kNN under
    torchrun splits the bank across the ranks and merges their neighbours: the same scores as one process."""
    args = ["knn,linear", "--cached-features", "--checkpoint", str(trained_ckpt), "--epochs", "30"]
    one = run_eval(tmp_path, *args, name="one.json")
    m = one["metrics"]
    assert m["linear_cached_best_top1"] >= 50.0        # 10 classes: chance is 10%
    assert one["details"]["linear"]["history"][-1]["train_loss"] < one["details"]["linear"]["history"][0]["train_loss"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29613",
                        "evaluate.py", *args, "--out", str(tmp_path / "two.json"), "data.batch_size=8"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["details"]["linear"]["global_batch"] == 16
    for key in ("linear_cached_top1", "linear_cached_top5", "linear_cached_best_top1"):
        assert two["metrics"][key] == pytest.approx(m[key], abs=1.01), key    # at most 2 of 200 images flip
    assert two["metrics"]["linear_cached_train_loss"] == pytest.approx(m["linear_cached_train_loss"], rel=1e-3)
    knn = {k: v for k, v in m.items() if k.startswith("knn_")}
    assert len(knn) == 4 and {k: two["metrics"][k] for k in knn} == knn
    assert two["details"]["knn"]["bank_size"] == one["details"]["knn"]["bank_size"] == 120
    assert two["details"]["knn"]["bank_per_rank_max"] == 60          # each rank holds half the bank


def test_semi_draws_writes_and_rereads_a_balanced_subset(trained_ckpt, tmp_path):
    common = ["--checkpoint", str(trained_ckpt), "--epochs", "1", "data.batch_size=8"]
    res = run_eval(tmp_path, "semi", "--train-percent", "10", "--seed", "3", *common, name="semi.json")
    d = res["details"]["semi"]
    assert d["subset_size"] == 10 and d["subset_per_class"] == [1, 1] and d["subset_classes"] == 10
    assert d["global_batch"] == 10 and d["hparams"]["bn"] == "train"          # the official default
    assert d["hparams"]["lr_backbone"] == 0.02 and d["train_percent"] == 10 and d["subset_seed"] == 3
    subset_file = tmp_path / "semi_subset.txt"
    lines = subset_file.read_text().split()
    assert len(lines) == 10 and len({x.split("/")[0] for x in lines}) == 10      # one image per class
    assert {"semi10_top1", "semi10_best_top5"} <= set(res["metrics"])
    again = run_eval(tmp_path, "semi", "--train-percent", "10", "--seed", "3", *common, name="again.json")
    assert (tmp_path / "again_subset.txt").read_text() == subset_file.read_text()   # reproducible from the seed
    assert again["metrics"] == pytest.approx(res["metrics"])
    given = run_eval(tmp_path, "semi", "--train-percent", "1", "--subset-file", str(subset_file), *common,
                     name="given.json")
    assert given["details"]["semi"]["subset"] == str(subset_file) and given["details"]["semi"]["subset_size"] == 10
    assert given["details"]["semi"]["hparams"]["lr_backbone"] == 0.04 and not (tmp_path / "given_subset.txt").exists()


def test_semi_one_percent_runs_as_typed_and_says_its_batch(trained_ckpt, tmp_path, capsys):
    """No batch flag or override: the 10 labelled images are fewer than the official global batch 256, so semi
    trains with batch 10 and one printed line says so (it used to stop: 'fewer training samples per process than
    data.batch_size')."""
    res = run_eval(tmp_path, "semi", "--train-percent", "1", "--checkpoint", str(trained_ckpt), "--epochs", "1")
    lines = [x for x in capsys.readouterr().out.splitlines() if "fewer than the global batch" in x]
    assert lines == ["semi1: 10 training samples are fewer than the global batch 256: training with batch 10 (10 "
                     "per process), the learning rates scaled to it"]
    assert res["details"]["semi"]["global_batch"] == 10
    assert res["details"]["semi"]["history"][0]["lr"] == pytest.approx(0.2 * 10 / 256)


def _torchvision_state_dict(path, seed):
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18().state_dict(), path)   # stock torchvision, fc included
    return path


def test_torchvision_state_dict_is_accepted(trained_ckpt, tmp_path, capsys):
    sd = _torchvision_state_dict(tmp_path / "resnet18.pth", 0)
    args = ["--checkpoint", str(sd), "--config", str(trained_ckpt.parent / "config.yaml")]
    res = run_eval(tmp_path, "knn", *args)
    assert "knn_top1_k20" in res["metrics"] and res["config"]["model"]["arch"] == "resnet18"
    assert "needs the trained head" in one_line_error(capsys, "cluster", *args)
    assert "does not match model.arch=resnet50" in one_line_error(capsys, "knn", *args, "model.arch=resnet50")


def test_trained_checkpoint_beats_random_backbones_on_knn(trained_ckpt, tmp_path):
    """Same data, same config, same protocol; the random backbones include seed 0, the trained network's own
    initialisation (train.seed=0), so the gap is what training added. 200 queries: one is 0.5 points."""
    trained = run_eval(tmp_path, "knn", "--checkpoint", str(trained_ckpt), "--ks", "20")["metrics"]["knn_top1_k20"]
    config = str(trained_ckpt.parent / "config.yaml")
    random = [run_eval(tmp_path, "knn", "--checkpoint", str(_torchvision_state_dict(tmp_path / f"r{s}.pth", s)),
                       "--config", config, "--ks", "20")["metrics"]["knn_top1_k20"] for s in range(3)]
    print(f"kNN top-1 (k=20): trained {trained:.1f}, random {random}")
    assert trained >= max(random) + 5.0, (trained, random)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker directory
        return os.makedirs, (self.marker,)


def test_refuses_to_unpickle_arbitrary_objects(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f, protocol=2)
    err = one_line_error(capsys, "knn", "--checkpoint", str(bad))
    assert "could not be read" in err and not marker.exists()


def test_bad_input_gives_one_line_errors(trained_ckpt, tmp_path, capsys):
    ck = ["--checkpoint", str(trained_ckpt)]
    assert "unknown protocol(s) lin" in one_line_error(capsys, "lin,knn", *ck)
    assert "semi needs --train-percent" in one_line_error(capsys, "semi", *ck)
    assert "apply to semi only" in one_line_error(capsys, "linear", "--train-percent", "1", *ck)
    assert "--cached-features applies to linear only" in one_line_error(capsys, "knn", "--cached-features", *ck)
    assert "not found" in one_line_error(capsys, "knn", "--checkpoint", str(tmp_path / "nope.pt"))
    assert "unknown config key 'data.pth'" in one_line_error(capsys, "knn", *ck, "data.pth=x")
    assert "epochs and eval-every must be > 0" in one_line_error(capsys, "linear", "--epochs", "0", *ck)
    assert "--batch-size must be > 0" in one_line_error(capsys, "linear", "--batch-size", "0", *ck)
    assert "--batch-size applies to linear and semi only" in one_line_error(capsys, "knn", "--batch-size", "64", *ck)
    (tmp_path / "subset.txt").write_text("nonexistent.jpg\n")
    assert "is not an image of the training split" in one_line_error(
        capsys, "semi", "--train-percent", "1", "--subset-file", str(tmp_path / "subset.txt"), *ck,
        "--out", str(tmp_path / "x.json"))


def test_baselines_init_and_pixels_sit_beside_the_checkpoint(trained_ckpt, tmp_path):
    """--baseline init,pixels: the untrained architecture (same seed: deterministic) and raw pixels, scored by the
    same protocols; pixel kNN equals kNN on the flattened evaluation views computed here directly."""
    from engine.config import load_config
    from evaluation.metrics import knn_accuracy
    from pipelines import build_pipeline

    res = run_eval(tmp_path, "knn,cluster", "--baseline", "init,pixels", "--checkpoint", str(trained_ckpt))
    base = res["baseline"]
    assert set(base) == {"init", "pixels"}
    assert set(base["init"]["metrics"]) == set(res["metrics"])           # every protocol, cluster included
    assert base["pixels"]["protocols"] == ["knn"] and "cluster_nmi" not in base["pixels"]["metrics"]
    assert base["init"]["metrics"] != res["metrics"]
    again = run_eval(tmp_path, "knn", "--baseline", "init", "--checkpoint", str(trained_ckpt), name="again.json")
    assert again["baseline"]["init"]["metrics"] == {k: v for k, v in base["init"]["metrics"].items()
                                                    if k.startswith("knn")}
    cfg = load_config(str(trained_ckpt.parent / "config.yaml"))
    feats = {}
    for split in (cfg.data.train_split, cfg.data.val_split):
        xs, ys, idx = [], [], []
        for b in build_pipeline(cfg, split, train=False):
            xs.append(b.views[0].flatten(1)), ys.append(b.labels), idx.append(b.indices)
        order = torch.cat(idx).argsort()
        feats[split] = torch.cat(xs)[order], torch.cat(ys)[order]
    direct = knn_accuracy(*feats[cfg.data.train_split], *feats[cfg.data.val_split], ks=(20, 200))
    for k, v in direct.items():
        assert base["pixels"]["metrics"][k] == pytest.approx(v)


def test_unknown_baseline_is_one_line_error(trained_ckpt, capsys):
    err = one_line_error(capsys, "knn", "--baseline", "init,noise", "--checkpoint", str(trained_ckpt))
    assert "--baseline" in err and "noise" in err
