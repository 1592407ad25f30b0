"""tools/gpu_check.py: the one-shot device check, run here in its --cpu-smoke mode (the same code paths on the
CPU at tiny sizes), and its handling of a failing CUDA test."""
import json

from PIL import Image

from tools.gpu_check import finish_cuda_tests, main, start_cuda_tests


def test_cpu_smoke_writes_the_report(tmp_path):
    out = tmp_path / "check"
    assert main(["--cpu-smoke", "--out", str(out), "--tests", "tests/engine/test_step_cuda.py"]) == 0
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["mode"] == "cpu-smoke" and r["views"] == [32, 32] + [16] * 6 and r["batch_size"] == 8
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
        assert "error" not in v, (name, v)
        assert v["pipeline"] == name and v["views"] == r["views"]
        for k in ("loader_samples_per_s", "model_samples_per_s", "end_to_end_samples_per_s"):
            assert v[k] > 0, (name, k)
        assert abs(v["ratio"] - v["end_to_end_samples_per_s"] / v["model_samples_per_s"]) < 1e-9
        assert v["pipeline_gpu_mem_device_gib"] is None and v["model_syncs_per_step"] is None   # CUDA only
    assert r["variants"]["pil"]["channels_last"] is False and r["variants"]["torch"]["channels_last"] is True
    assert set(r["targets"]) == set(r["variants"]) - {"pil"}
    twelve = r["model_only_12_local"]
    assert twelve["views"] == [32, 32] + [16] * 12 and twelve["samples_per_s"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "| measure | " + " | ".join(r["variants"]) + " |" in md
    assert f"{t['skipped']} skipped" in md and "| end-to-end / model-only |" in md
    assert "official 12 local views" in md


def test_a_failing_cuda_test_is_recorded(tmp_path):
    f = tmp_path / "test_fake_cuda.py"
    f.write_text("import pytest\n\n\n@pytest.mark.cuda\ndef test_breaks():\n    assert 1 == 2\n\n\n"
                 "@pytest.mark.cuda\ndef test_holds():\n    pass\n\n\ndef test_not_cuda():\n    pass\n")
    log = tmp_path / "log.txt"
    proc, left_out = start_cuda_tests([str(f)], log)
    r = finish_cuda_tests(proc, log, left_out, timeout=120)
    assert r["failed"] == 1 and r["passed"] == 1
    assert len(r["failures"]) == 1 and r["failures"][0].endswith("test_fake_cuda.py::test_breaks")
