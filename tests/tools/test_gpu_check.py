"""tools/gpu_check.py: the one-shot device check, run here in its --cpu-smoke mode (the same code paths on the
CPU at tiny sizes), and its handling of a failing CUDA test."""
import json
import time

import pytest
from PIL import Image

from tools.gpu_check import finish_cuda_tests, main, start_cuda_tests


def test_cpu_smoke_writes_the_report(tmp_path):
    out = tmp_path / "check"
    # dali (the last backend stage, covered by tests/pipelines/test_dali_*) is left out for time
    assert main(["--cpu-smoke", "--out", str(out), "--backends", "torch,pil",
                 "--tests", "tests/engine/test_step_cuda.py"]) == 0
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["mode"] == "cpu-smoke" and r["views"] == [32, 32] + [16] * 6 and r["batch_size"] == 8
    stages = [s["stage"] for s in r["stages"]]           # in order of value, every one finished
    assert stages[:5] == ["environment", "torch: loader", "torch: model", "torch: end_to_end", "cuda tests"]
    assert stages[5:8] == ["pil: loader", "pil: model", "pil: end_to_end"] and stages[-1] == "local12: model"
    assert all(s["status"] == "ok" and 0 < s["seconds"] <= s["deadline_s"] for s in r["stages"]), r["stages"]
    t = r["cuda_tests"]
    assert t["failed"] == 0 and t["passed"] == 0 and t["skipped"] >= 1   # no CUDA here: skipped, not failed
    d = r["dataset"]
    files = sorted((out / "data" / "train").rglob("*.JPEG"))
    assert d["files"] == len(files) == 48 and d["cmyk"] == 1 and d["gray"] > 0 and d["progressive"] > 0
    modes = [Image.open(f).mode for f in files]
    assert modes.count("CMYK") == 1 and modes.count("L") == d["gray"]
    assert sum(Image.open(f).info.get("progressive", 0) for f in files) == d["progressive"]
    assert {"pil", "torch"} <= set(r["variants"])
    for name, v in r["variants"].items():
        assert v["pipeline"] == name and v["views"] == r["views"] and v["workers"] == 2   # workers, as on a GPU
        for k in ("loader_samples_per_s", "model_samples_per_s", "end_to_end_samples_per_s"):
            assert v[k] > 0, (name, k)
        assert abs(v["ratio"] - v["end_to_end_samples_per_s"] / v["model_samples_per_s"]) < 1e-9
        assert v["pipeline_gpu_mem_device_gib"] is None and v["model_syncs_per_step"] is None   # CUDA only
    torch_, pil = r["variants"]["torch"], r["variants"]["pil"]
    assert (torch_["compile"], torch_["precision"], torch_["channels_last"]) == (True, "bf16", True)  # as on a GPU
    assert (pil["compile"], pil["channels_last"]) == (False, False)
    assert set(r["targets"]) == set(r["variants"]) - {"pil"}
    twelve = r["model_only_12_local"]
    assert twelve["views"] == [32, 32] + [16] * 12 and twelve["samples_per_s"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "| measure | " + " | ".join(r["variants"]) + " |" in md and "| torch: model | ok |" in md
    assert f"{t['skipped']} skipped" in md and "| end-to-end / model-only |" in md
    assert "official 12 local views" in md


@pytest.mark.parametrize("poll_s", [None, 4.0], ids=["prompt parent", "parent polling late (a loaded machine)"])
def test_a_stage_past_its_deadline_is_stopped_and_the_report_still_written(tmp_path, monkeypatch, capsys, poll_s):
    """The pil model phase gets 0.1 s (its steps take ~0.7 s on an idle 2-core machine: it is stopped, or judged
    by the finish time the child records when the parent notices late, as on a loaded machine), the budget then runs
    out: the report holds what finished, each stage's status, and the exit status says so in one line."""
    import tools.gpu_check as gc
    if poll_s:          # the parent looks only every 4 s: the child has finished the model phase by then
        sleep = time.sleep
        monkeypatch.setattr(gc.time, "sleep", lambda _s: sleep(poll_s))
    monkeypatch.setattr(gc, "STAGES", [(n, g, 0.1 if n == "pil: model" else c) for n, g, c in gc.STAGES])
    fake = tmp_path / "test_fake_cuda.py"
    fake.write_text("import pytest\n\n\n@pytest.mark.cuda\ndef test_holds():\n    pass\n")
    out = tmp_path / "check"
    assert main(["--cpu-smoke", "--out", str(out), "--backends", "pil", "--tests", str(fake)]) == 1
    r = json.loads((out / "gpu_check.json").read_text())
    status = {s["stage"]: s["status"] for s in r["stages"]}
    assert status == {"environment": "ok", "cuda tests": "ok", "pil: loader": "ok", "pil: model": "timeout",
                      "pil: end_to_end": "not run", "local12: model": "ok"}
    model = next(s for s in r["stages"] if s["stage"] == "pil: model")
    assert model["deadline_s"] == 0.1 and model["seconds"] > 0.1 and "ran past its 0.1 s deadline" in model["error"]
    assert r["variants"]["pil"]["loader_samples_per_s"] > 0 and "model_samples_per_s" not in r["variants"]["pil"]
    assert r["cuda_tests"]["passed"] == 1
    assert "| pil: model | timeout |" in (out / "gpu_check.md").read_text()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pil: model timeout" in err


def test_a_failing_cuda_test_is_recorded(tmp_path):
    f = tmp_path / "test_fake_cuda.py"
    f.write_text("import pytest\n\n\n@pytest.mark.cuda\ndef test_breaks():\n    assert 1 == 2\n\n\n"
                 "@pytest.mark.cuda\ndef test_holds():\n    pass\n\n\ndef test_not_cuda():\n    pass\n")
    log = tmp_path / "log.txt"
    proc, left_out = start_cuda_tests([str(f)], log)
    r = finish_cuda_tests(proc, log, left_out, timeout=120)
    assert r["failed"] == 1 and r["passed"] == 1
    assert len(r["failures"]) == 1 and r["failures"][0].endswith("test_fake_cuda.py::test_breaks")
