"""TWIST learns: the few steps behind the shared tiny checkpoint (tests/conftest.py: trained_ckpt, 3 epochs on
10 photo classes) lower the loss and lift the head's clustering above the same network at initialisation."""
import json

import evaluate


def test_a_few_twist_steps_lower_the_loss_and_raise_the_head_nmi_above_init(trained_ckpt, tmp_path):
    rows = [json.loads(x) for x in (trained_ckpt.parent / "log.jsonl").read_text().splitlines()]
    losses = [r["total"] for r in rows]
    assert len(losses) >= 6
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, (first, last)
    out = tmp_path / "cluster.json"
    assert evaluate.main(["cluster", "--baseline", "init", "--checkpoint", str(trained_ckpt), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    trained, init = res["metrics"]["cluster_nmi"], res["baseline"]["init"]["metrics"]["cluster_nmi"]
    assert trained > init + 0.05, (trained, init)
