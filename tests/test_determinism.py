"""Same seed, config and data: bit-identical CPU losses, whatever the machine load and data.workers."""
import json
import subprocess
import sys

import pytest

from engine.trainer import train
from tests.conftest import tiny_config


@pytest.fixture
def busy_machine():
    """Two CPU-bound processes beside the test, as on a shared CI machine."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for p in procs:
        p.kill()
        p.wait()


def loss_rows(run) -> list[tuple[int, str]]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], repr(r["total"])) for r in rows if "total" in r]


def test_losses_are_bit_identical_across_workers_on_a_busy_machine(tiny_data, tmp_path, busy_machine):
    runs = {}
    for workers in (0, 2):
        cfg = tiny_config(tiny_data, tmp_path / f"w{workers}", f"data.workers={workers}", "train.max_steps=4",
                          "train.monitor_every_epochs=1", "train.monitor_bank=60", "train.monitor_queries=20")
        train(cfg)
        runs[workers] = loss_rows(tmp_path / f"w{workers}")
    assert len(runs[0]) == 4
    assert runs[2] == runs[0]


def test_train_threads_pins_the_count_and_deterministic_mode_keeps_the_cpu_losses(tiny_data, tmp_path):
    import torch
    base = ("train.max_steps=3", "data.workers=0")
    train(tiny_config(tiny_data, tmp_path / "plain", *base))
    try:
        train(tiny_config(tiny_data, tmp_path / "det", *base, "train.deterministic=true", "train.threads=1"))
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        train(tiny_config(tiny_data, tmp_path / "det2", *base, "train.deterministic=true", "train.threads=2"))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.get_num_threads() == 2
    assert len(loss_rows(tmp_path / "plain")) == 3
    assert loss_rows(tmp_path / "det2") == loss_rows(tmp_path / "plain")   # the CPU needs no special mode
