"""End-to-end: train.py's loop and evaluate.py with method=self_classifier (one process; the 2-process loss is
tested in tests/models/test_self_classifier_loss.py)."""
import json

import pytest

import evaluate
from engine import checkpoint as ckpt
from engine.trainer import train
from tests.conftest import tiny_config

SC = ["method=self_classifier", "self_classifier.classes=[10,16]", "self_classifier.hidden_dim=64",
      "self_classifier.dim=16", "self_classifier.queue_len=32",  # the nearest-neighbour queue fills at step 2
      "train.epochs=1", "train.max_steps=3"]


@pytest.fixture(scope="module")
def sc_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("sc") / "run"
    out = train(tiny_config(tiny_data, run, *SC))
    return tiny_data, run, out


def test_trains_and_checkpoints_self_classifier(sc_run):
    _, run, out = sc_run
    state = ckpt.load(run / "checkpoint.pt")
    assert state["config"]["method"] == "self_classifier"
    assert any(k.startswith("head.classifiers.1.weight_v") for k in state["model"])
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(rows) == out["global_step"] == 3
    assert all({"total", "ce0", "ce1", "lr"} <= set(r) for r in rows)


def test_evaluate_cluster_on_a_chosen_classifier(sc_run, capsys):
    data, run, _ = sc_run
    out = run.parent / "eval.json"
    assert evaluate.main(["knn,cluster", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out),
                          "--classifier", "1", f"data.path={data}", "data.workers=0"]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "self_classifier" and res["classifier"] == 1
    m = res["metrics"]
    assert 0 <= m["knn_top1_k20"] <= 100 and 0 <= m["cluster_nmi"] <= 1
    assert 1 <= m["cluster_clusters_used"] <= 16  # classifier 1 has 16 classes
    capsys.readouterr()
    assert evaluate.main(["cluster", "--checkpoint", str(run / "checkpoint.pt"), "--classifier", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "classifier 2 is out of range; this model has 2" in err
