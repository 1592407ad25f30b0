"""Every mistake a user can make on the command line or in a config ends in one line on stderr, a non-zero exit
and no traceback, naming the key or path (engine/cli.py). Each case runs the real entry point as a subprocess
and fails at start-up; the cases run in parallel threads (they mostly wait on interpreter start-up and imports).
`--debug` is the one way to get the traceback back."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/fasttwist-data"


def _cases(w: Path) -> dict[str, tuple[list[str], str]]:
    """id -> (command after `python`, text the one line must contain). `w` holds the fixtures' files."""
    train = ["train.py", "--config", "configs/demo.yaml", f"data.path={w / 'tiny'}", "train.device=cpu",
             "data.workers=0", f"train.out_dir={w / 'run'}", "model.head_hidden=32", "model.head_dim=8",
             "train.monitor_every_epochs=0", "data.batch_size=8"]
    sc = str(w / "sc.pt")
    return {
        # train.py: config keys and values (every key's rule and message: tests/engine/test_config.py, in-process)
        "unknown key": (train + ["optim.lrr=1"], "'optim.lrr'"),
        "out of range": (train + ["optim.lr=0"], "'optim.lr': must be > 0"),
        "jitter_p": (train + ["augment.jitter_p=2"], "'augment.jitter_p': must be a probability"),
        "global_scale": (train + ["augment.global_scale=[1.0,0.4]"], "'augment.global_scale': must be [min, max]"),
        "bunch not multiple": (train + ["model.head_bn=bunch", "model.bunch_size=12"], "'model.bunch_size'"),
        "override without =": (train + ["optim.lr"], "override 'optim.lr': expected KEY=VALUE"),
        # train.py: files and flags
        "missing recipe": (["train.py", "--config", "configs/nope.yaml"], "'configs/nope.yaml' not found"),
        "recipe not YAML": (["train.py", "--config", str(w / "bad.yaml")], "bad.yaml' is not valid YAML"),
        "unknown flag": (train + ["--bogus"], "unrecognized arguments: --bogus"),
        "missing --config": (["train.py"], "--config"),
        "missing dataset": (train + [f"data.path={MISSING}"], f"'{MISSING}' not found; set data.path"),
        "files straight in train/": (train + [f"data.path={w / 'flat'}"], "train' holds 2 files but no class "
                                                                          "folders"),
        "resume missing file": (train + ["--resume", str(w / "none.pt")], "none.pt' not found"),
        "resume corrupt file": (train + ["--resume", str(w / "corrupt.pt")], "corrupt.pt' could not be read"),
        # evaluate.py
        "eval unknown protocol": (["evaluate.py", "knnn", "--checkpoint", sc], "unknown protocol(s) knnn"),
        "eval missing checkpoint": (["evaluate.py", "knn", "--checkpoint", str(w / "none.pt")], "none.pt' not found"),
        "eval corrupt checkpoint": (["evaluate.py", "knn", "--checkpoint", str(w / "corrupt.pt")], "could not be "
                                                                                                   "read"),
        "eval wrong method": (["evaluate.py", "knn", "--checkpoint", sc, "--config", "configs/demo.yaml"],
                              "holds method=self_classifier"),
        "eval semi without percent": (["evaluate.py", "semi", "--checkpoint", sc], "--train-percent"),
        "eval missing dataset": (["evaluate.py", "knn", "--checkpoint", sc, f"data.path={MISSING}"], MISSING),
        # the tools
        "convert missing source": (["tools/convert.py", MISSING, str(w / "o"), "--format", "shards"], MISSING),
        "convert bad quality": (["tools/convert.py", str(w / "tiny"), str(w / "o"), "--format", "shards",
                                 "--quality", "0"], "--quality"),
        "profiler missing dataset": (["tools/profiler.py", "--config", "demo", "--data", MISSING], MISSING),
        "profiler bad key": (["tools/profiler.py", "--config", "demo", "augment.gray_p=-1"], "'augment.gray_p'"),
        "profiler files missing": (["tools/profiler.py", "files", "--data", MISSING], MISSING),
        "show_views missing dataset": (["tools/show_views.py", "--data", MISSING, "--out", str(w / "v.png")],
                                       MISSING),
        "show_views bad key": (["tools/show_views.py", "--data", str(w / "tiny"), "augment.num_local=-1"],
                               "'augment.num_local'"),
        "export missing checkpoint": (["tools/export.py", str(w / "none.pt"), "--to", "timm", "--out",
                                       str(w / "b.pth")], "none.pt' not found"),
        "export wrong arch": (["tools/export.py", sc, "--to", "timm", "--out", str(w / "b.pth"),
                               "model.arch=resnet50"], "holds model.arch=resnet18"),
        "plot_run no log": (["tools/plot_run.py", str(w)], "log.jsonl"),
        "demo_data bad size": (["tools/demo_data.py", str(w / "d"), "--size", "-3"], "--size"),
        "demo_data unwritable": (["tools/demo_data.py", "/proc/fasttwist-demo", "--limit-per-class", "1",
                                  "--val-per-class", "0", "--size", "16"], "/proc/fasttwist-demo"),
        "gpu_check unknown backend": (["tools/gpu_check.py", "--cpu-smoke", "--out", str(w / "g"), "--backends",
                                       "pil,nope"], "unknown nope; choose from"),
        "gpu_check unwritable out": (["tools/gpu_check.py", "--cpu-smoke", "--out", "/proc/fasttwist-gc"],
                                     "argument --out: cannot create /proc/fasttwist-gc"),
    }


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def _fixtures(w: Path) -> None:
    from engine.config import load_config, to_dict
    from methods.registry import build_model
    from tools.demo_data import build_demo
    build_demo(w / "tiny", limit_per_class=2, val_per_class=1, size=32)
    for name in ("a.jpg", "b.jpg"):                       # files with no class folder around them
        (w / "flat" / "train").mkdir(parents=True, exist_ok=True)
        (w / "flat" / "train" / name).write_bytes(b"x")
    (w / "bad.yaml").write_text("data: [unclosed\n")
    (w / "corrupt.pt").write_bytes(b"\x00" * 64)
    cfg = load_config("configs/demo.yaml", ["method=self_classifier", "self_classifier.classes=[10,20]",
                                            "self_classifier.hidden_dim=32", "self_classifier.dim=16",
                                            "self_classifier.queue_len=0"])
    torch.save({"model": build_model(cfg).state_dict(), "config": to_dict(cfg)}, w / "sc.pt")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    w = tmp_path_factory.mktemp("mistakes")
    _fixtures(w)
    cases = _cases(w)
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = dict(zip(cases, pool.map(_run, [cmd for cmd, _ in cases.values()])))
    return {k: (runs[k], cases[k][1]) for k in cases}


def test_at_least_twenty_kinds_over_every_entry_point(tmp_path):
    cases = _cases(tmp_path)
    assert len(cases) >= 20
    scripts = {cmd[0] for cmd, _ in cases.values()}
    assert scripts == {"train.py", "evaluate.py", "tools/convert.py", "tools/profiler.py", "tools/show_views.py",
                       "tools/export.py", "tools/plot_run.py", "tools/demo_data.py", "tools/gpu_check.py"}


@pytest.mark.parametrize("case", list(_cases(Path("/w"))))
def test_mistake_ends_in_one_line(outcomes, case):
    r, expected = outcomes[case]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0, r.stdout[-500:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]
    assert expected in lines[0], lines[0]


def test_missing_user_dataset_does_not_suggest_building_the_demo(outcomes):
    r, _ = outcomes["missing dataset"]
    assert "demo_data" not in r.stderr


def test_debug_shows_the_traceback():
    r = _run(["train.py", "--config", "configs/demo.yaml", "augment.jitter_p=2", "--debug"])
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_under_torchrun_the_line_is_printed_once_per_node():
    """2 local ranks meet the same mistake: our line appears once (torchrun then adds its own failure summary)."""
    r = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", "--config", "configs/demo.yaml",
              "optim.lrr=1"])
    assert r.returncode != 0
    assert sum("train.py: " in line and "'optim.lrr'" in line for line in r.stderr.splitlines()) == 1, r.stderr
