import json

import pytest

from tools.profiler import cpu_seconds, main, verdict


def test_verdict_names_the_bottleneck():
    assert verdict(500, 1000, 480, 4)[0] == "data"
    assert "data.workers (now 4)" in verdict(500, 1000, 480, 4)[2]
    b, ratio, _ = verdict(5000, 1000, 800, 4)
    assert b == "overlap" and ratio == pytest.approx(0.8)
    assert verdict(5000, 1000, 990, 4)[:2] == ("model", pytest.approx(0.99))


def test_cpu_seconds_counts_work():
    t0 = cpu_seconds()
    x = 0
    for i in range(2_000_000):
        x += i * i
    assert cpu_seconds() - t0 > 0.05


def test_profile_runs_on_cpu_and_writes_json(tiny_data, tmp_path):
    out = tmp_path / "p.json"
    rc = main(["--config", "configs/demo.yaml", "--data", str(tiny_data), "--steps", "2", "--warmup", "1",
               "--json", str(out), "data.batch_size=8", "data.workers=0", "augment.global_size=32",
               "augment.local_size=16", "augment.num_local=2", "model.head_hidden=32", "model.head_dim=8",
               "model.arch=resnet18"])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("loader_samples_per_s", "model_samples_per_s", "end_to_end_samples_per_s", "ratio", "bottleneck",
                "device", "pipeline", "batch_size", "views"):
        assert key in r
    assert r["pipeline"] == "torch" and r["batch_size"] == 8 and r["views"] == [32, 32, 16, 16]
    assert r["loader_samples_per_s"] > 0 and r["model_samples_per_s"] > 0 and r["end_to_end_samples_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["end_to_end_samples_per_s"] / r["model_samples_per_s"])
    assert r["bottleneck"] in ("data", "model", "overlap")
    assert r["forward_ms"] > 0 and r["backward_ms"] > 0 and r["optimizer_ms"] > 0


def test_profile_baseline_pipeline_and_too_little_data(tiny_data, tmp_path, capsys):
    common = ["--config", "configs/demo.yaml", "--data", str(tiny_data), "data.workers=0", "model.arch=resnet18",
              "augment.global_size=32", "augment.local_size=16", "model.head_hidden=32", "model.head_dim=8"]
    out = tmp_path / "pil.json"
    assert main([*common, "--pipeline", "pil", "--steps", "2", "--warmup", "1", "--json", str(out),
                 "data.batch_size=8"]) == 0
    assert json.loads(out.read_text())["pipeline"] == "pil"
    assert main([*common, "--steps", "50", "data.batch_size=8"]) == 2
    assert "lower --steps" in capsys.readouterr().err


def test_files_subcommand_times_listing_and_the_check(bad_folder, tmp_path):
    out = tmp_path / "files.json"
    assert main(["files", "--data", str(bad_folder), "--threads", "1,3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["files"] == 120 + 7 and r["list_seconds"] >= 0
    assert [c["threads"] for c in r["check"]] == [1, 3]
    assert all(c["bad"] == 4 and c["files_per_s"] > 0 for c in r["check"])   # empty, text, truncated, folder


def test_link_tree_makes_an_imagenet_shaped_folder_of_hard_links(tmp_path):
    import os
    from pipelines.sources import load_source
    from tools.imagenet_like import link_tree
    cls = tmp_path / "train" / "0_x"
    cls.mkdir(parents=True)
    for k in range(3):
        (cls / f"{k}.JPEG").write_bytes(bytes([k]) * 10)
    r = link_tree(tmp_path, 25, classes=5)
    files, labels = load_source(tmp_path / "links", "train")
    assert r["links"] == len(files) == 25 and sorted(set(labels)) == list(range(5))
    assert all(os.stat(f).st_nlink > 1 for f in files)
