"""What a run prints when stdout is a log file (SLURM, nohup, `| tee`): whole lines, no animation."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_piped_training_prints_whole_lines_without_carriage_returns(tiny_data, tmp_path):
    """A run directory path longer than any console width, a narrow COLUMNS and a colour TERM (CI's unset COLUMNS
    is what every other subprocess test runs with): progress, resume and done lines stay one line each."""
    run = tmp_path / ("a-run-folder-whose-name-alone-is-longer-than-eighty-columns-" + "x" * 40)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERM")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="30", TERM="xterm-256color")
    base = [sys.executable, "train.py", "--config", "configs/demo.yaml", f"data.path={tiny_data}",
            f"train.out_dir={run}", "data.batch_size=16", "data.workers=0", "augment.global_size=32",
            "model.head_hidden=64", "model.head_dim=16", "train.log_every=2", "train.monitor_every_epochs=0"]
    first = subprocess.run(base + ["train.max_steps=4"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run(base + ["train.max_steps=6", "--resume", "auto"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    out = first.stdout + second.stdout
    assert "\r" not in out and "\x1b" not in out          # no animation, no colour codes in a log
    lines = out.splitlines()
    assert f"done: step 4, checkpoint {run / 'checkpoint.pt'}" in lines
    assert f"resumed from {run / 'checkpoint.pt'} at epoch 0, step 4" in lines
    assert f"done: step 6, checkpoint {run / 'checkpoint.pt'}" in lines
    progress = [x for x in lines if x.startswith("train ")]
    # one line per log step (every 2 steps), each whole: 'train 2/6 epoch 0 loss -0.1234 56 samples/s'
    assert [x.split()[1] for x in progress] == ["2/4", "4/4", "6/6"]
    assert all(" loss " in x and x.endswith("samples/s") for x in progress)


def test_a_run_records_what_its_numbers_depend_on(tiny_data, tmp_path):
    import json

    import torch

    from engine.trainer import train
    from tests.conftest import tiny_config
    train(tiny_config(tiny_data, tmp_path, "train.max_steps=1", "train.threads=1"))
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch_threads"] == 1 and env["world_size"] == 1 and env["device"] == "cpu"
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] and "pillow" in env["packages"]
