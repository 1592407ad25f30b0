"""Every command line README.md shows for train.py, evaluate.py and tools/ runs as a user types it: as a
subprocess, from the repository root and from another directory. Only the README's placeholders change
(/data/imagenet -> a tiny demo set, CKPT -> a tiny checkpoint, ...), tiny-size arguments are appended, and
`torchrun --nproc_per_node=8` becomes 2 CPU processes. When the README and the tools drift apart, this fails."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = ("make", "pip", "venv", "pytest", "apt-get", "sudo", "cd ", "git ")
# the README's multi-node line needs two machines; tests/test_multinode.py runs it as two local "nodes"
MULTI_NODE = "--nnodes="

TINY_TRAIN = ["data.batch_size=16", "data.workers=0", "augment.global_size=32", "augment.local_size=16",
              "augment.num_local=2", "eval.resize=32", "eval.crop=32", "model.arch=resnet18",
              "model.head_hidden=64", "model.head_dim=16", "model.bunch_size=16", "train.epochs=1",
              "self_label.start_epoch=0", "train.max_steps=2", "train.log_every=1",
              "train.monitor_every_epochs=0"]   # the demo recipe's online kNN: tests/engine/test_long_run.py
# appended per script (argparse keeps the last value of a repeated flag)
TINY = {
    "train.py": TINY_TRAIN,
    "evaluate.py": ["--epochs", "1", "data.workers=0", "data.batch_size=8"],
    "profiler.py": ["--steps", "2", "--warmup", "1", *TINY_TRAIN],
    "show_views.py": ["--n", "2", "data.workers=0", "augment.global_size=32", "augment.local_size=16"],
    "demo_data.py": ["--limit-per-class", "4", "--val-per-class", "2", "--size", "32"],
    "convert.py": ["--workers", "1"],
    # the CUDA tests of one file instead of collecting the whole suite again (25 s -> ~10 s a run);
    # tests/tools/test_gpu_check.py checks the report of the same call
    "gpu_check.py": ["--tests", "tests/engine/test_step_cuda.py", "--backends", "pil"],   # all: tests/tools
}


def readme_commands() -> list[str]:
    text = README.read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#") or any(line.startswith(s) or f" {s}" in line for s in SKIP):
                continue
            if line.split()[0] in ("python", "torchrun"):
                lines.append(line)
    return lines


def _strip_optional(cmd: str) -> str:
    while True:
        new = re.sub(r"\s*\[[^\[\]]*\]", "", cmd)
        if new == cmd:
            return new
        cmd = new


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_argv(cmd: str, box: dict, from_root: bool) -> list[str]:
    """The README line as argv: optional [..] parts dropped, first of a|b alternatives, placeholders filled."""
    cmd = _strip_optional(cmd)
    if "demo_data.py" in cmd:                       # it builds the demo set: into the sandbox, not over it
        cmd = cmd.replace("data/demo", str(box["out"] / "demo"))
    subs = [("/data/imagenet-ffcv", box["ffcv"]), ("/data/imagenet-wds", box["wds"]),
            ("/data/imagenet", box["data"]), ("data/demo", box["data"])]
    for old, new in subs:
        cmd = cmd.replace(old, str(new))
    argv = []
    for tok in shlex.split(cmd):
        tok = tok.split("|")[0] if "|" in tok else tok
        if tok == "CKPT" or re.fullmatch(r"runs/\w+/checkpoint\.pt", tok):
            tok = str(box["sc_ckpt"] if "self_classifier" in tok else box["ckpt"])
        elif re.fullmatch(r"runs/[A-Z]+", tok):
            tok = str(box["ckpt"].parent)
        elif re.fullmatch(r"runs/[\w./-]+", tok):           # an output folder
            tok = str(box["out"] / tok)
        elif tok.endswith("percent.txt"):
            tok = str(box["subset"])
        elif re.fullmatch(r"[\w.-]+\.(png|json|pth|pt)", tok):
            tok = str(box["out"] / tok)
        argv.append(tok)
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", f"--master_port={_free_port()}"] + [
            "--nproc_per_node=2" if a.startswith("--nproc_per_node") else a for a in argv[1:]]
    else:
        argv[0] = sys.executable
    script = next(a for a in argv if a.endswith(".py"))
    at = argv.index(script)
    if not from_root:
        argv[at] = str(ROOT / script)
    extra = list(TINY.get(Path(script).name, []))
    if argv[at + 1:at + 2] == ["files"]:   # the profiler's file-check subcommand: nothing to shrink
        return argv
    if Path(script).name in ("train.py", "profiler.py") and not any(a.startswith("data.path=") for a in argv):
        extra.append(f"data.path={box['data']}")    # the demo set that `make demo` builds in data/demo
    if Path(script).name == "train.py":
        box["runs"] += 1
        extra.append(f"train.out_dir={box['out'] / ('run%d' % box['runs'])}")
    return argv + extra


@pytest.fixture(scope="module")
def box(tiny_data, tmp_path_factory):
    """Placeholders' stand-ins: the tiny demo set, a TWIST and a Self-Classifier checkpoint, a 1% subset file."""
    from engine.trainer import train
    from pipelines.sources import load_source
    from tests.conftest import tiny_config
    base = tmp_path_factory.mktemp("readme")
    train(tiny_config(tiny_data, base / "twist", "train.epochs=1", "train.max_steps=2"))
    train(tiny_config(tiny_data, base / "sc", "method=self_classifier", "self_classifier.classes=[10,16]",
                      "self_classifier.hidden_dim=64", "self_classifier.dim=16", "train.epochs=1",
                      "train.max_steps=2"))
    files, _ = load_source(tiny_data, "train")
    subset = base / "1percent.txt"
    subset.write_text("".join(Path(f).name + "\n" for f in files[::12]))
    out = base / "out"
    out.mkdir()
    return {"data": tiny_data, "ckpt": base / "twist" / "checkpoint.pt", "sc_ckpt": base / "sc" / "checkpoint.pt",
            "subset": subset, "out": out, "ffcv": base / "imagenet-ffcv", "wds": base / "imagenet-wds",
            "elsewhere": tmp_path_factory.mktemp("elsewhere"), "runs": 0}


COMMANDS = readme_commands()


def test_readme_shows_the_commands():
    scripts = {Path(c.split(".py")[0].split()[-1] + ".py").name for c in COMMANDS}
    assert {"train.py", "evaluate.py", "convert.py", "profiler.py", "show_views.py", "demo_data.py"} <= scripts


@pytest.mark.parametrize("from_root", [True, False], ids=["repo-root", "elsewhere"])
@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command_runs_as_written(cmd, from_root, box):
    if MULTI_NODE in cmd:
        pytest.skip("multi-node: needs two machines; tests/test_multinode.py runs two local nodes")
    argv = to_argv(cmd, box, from_root)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cwd = ROOT if from_root else box["elsewhere"]
    before = set(os.listdir(ROOT))
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README: {cmd}\nran: {shlex.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    leftovers = set(os.listdir(ROOT)) - before
    for name in leftovers:                      # a command that writes into the checkout is a finding, too
        shutil.rmtree(ROOT / name, ignore_errors=True)
    assert not leftovers, f"{cmd} wrote {sorted(leftovers)} into the repository"
