"""The pictures: training curves (tools/plot_run.py), TensorBoard events, the cluster gallery
(evaluate.py --gallery), the profiler's bars (tools/profiler.py --plot) and the augmented views
(tools/show_views.py). Each PNG is checked for its size, its panels and ink in every panel, and each figure for
the text and layout that make it readable without the README (titles, labels, legends off the data, tile sizes)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_config
from tools.image_grids import GALLERY_TOP
from tools.plots import DPI, PANEL_H, PANEL_W, STAGES, stage_ms
from tools.plot_run import main as plot_run

BLUE = (31, 119, 180)      # matplotlib's first colour: every curve panel draws at least one line in it


def load_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def cells(img: np.ndarray, rows: int, cols: int):
    h, w = img.shape[0] // rows, img.shape[1] // cols
    return [img[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(rows) for c in range(cols)]


def has_colour(cell: np.ndarray, rgb, tol: int = 12, min_pixels: int = 20) -> bool:
    return int((np.abs(cell - np.array(rgb)).max(axis=2) <= tol).sum()) >= min_pixels


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    """2 epochs of 3 steps, the second in the self-labeling phase, logging every step (TensorBoard too when
    installed)."""
    from engine.trainer import train
    try:
        import tensorboard  # noqa: F401
        tb = "true"
    except ImportError:
        tb = "false"
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(tiny_data, out, "self_label.start_epoch=1", "data.batch_size=40", "augment.num_local=0",
                      f"train.tensorboard={tb}"))
    return out


def test_curves_png(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("*.pt", "tensorboard"))
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 999, "kl": 0.')      # a run still writing its next line
    assert plot_run([str(run)]) == 0
    assert "4 panels: loss, learning rate, samples/s, threshold" in capsys.readouterr().out
    img = load_rgb(run / "curves.png")
    assert img.shape == (round(2 * PANEL_H * DPI), round(2 * PANEL_W * DPI), 3)
    for i, cell in enumerate(cells(img, 2, 2)):
        assert has_colour(cell, BLUE), f"panel {i} has no curve"
        assert has_colour(cell, (253, 235, 220), tol=8, min_pixels=500), f"panel {i}: self-labeling not shaded"
    assert plot_run([str(tmp_path / "nothing")]) == 2


def test_curves_self_classifier_and_monitor(tmp_path, capsys):
    """Per-classifier losses get their own panel; an extra scalar logged every few steps (a kNN monitor) too."""
    recs = [{"step": s, "epoch": 0, "time": float(s), "lr": 0.1 * s, "samples_per_s": 100.0 + s,
             "gpu_mem_gib": 1.5, "ce0": 2.0 / s, "ce1": 3.0 / s, "total": 2.5 / s} for s in range(1, 21)]
    for r in recs[4::5]:
        r["knn_top1"] = 10.0 + r["step"]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert plot_run([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    assert ("6 panels: loss (mean over classifiers), loss per classifier, learning rate, samples/s, "
            "GPU memory peak (GiB), knn_top1") in capsys.readouterr().out
    img = load_rgb(tmp_path / "c.png")
    assert img.shape == (round(3 * PANEL_H * DPI), round(2 * PANEL_W * DPI), 3)
    assert all(has_colour(c, BLUE) for c in cells(img, 3, 2))


def test_monitor_panel_marks_init_and_the_raw_pixel_reference(tmp_path, capsys):
    """The monitor's step-0 row carries the raw-pixel kNN: drawn as a dashed red line in the monitor's panel
    (not a panel of its own), the step-0 point labelled as the network at initialisation."""
    recs = [{"step": s, "epoch": s // 10, "time": float(s), "total": 1.0 / (s + 1)} for s in range(1, 31)]
    recs.insert(0, {"step": 0, "epoch": 0, "time": 0.0, "monitor_knn_top1": 40.0, "monitor_pixels_knn_top1": 70.0,
                    "monitor_seconds": 5.0})
    recs += [{"step": s, "epoch": s // 10, "time": float(s), "monitor_knn_top1": 40.0 + s} for s in (10, 20, 30)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert plot_run([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    assert "2 panels: loss, online kNN top-1 (%)" in capsys.readouterr().out
    img = load_rgb(tmp_path / "c.png")
    loss, monitor = cells(img, 1, 2)
    red = (214, 39, 40)      # matplotlib "tab:red"
    # legends sit outside the axes on the right, so the right panel's axes start a little left of the middle
    assert has_colour(monitor, red, min_pixels=100) and not has_colour(loss[:, :500], red)


def test_curves_figure_reads_without_the_readme():
    """A 3-step run with one monitor point: integer step ticks, every legend outside its axes (on no curve),
    and the near-empty monitor panel says how often the monitor ran instead of looking broken."""
    from tools.plots import curves_figure
    plt = pytest.importorskip("matplotlib.pyplot")
    recs = [{"step": 0, "epoch": 0, "time": 0.0, "monitor_knn_top1": 57.5, "monitor_pixels_knn_top1": 77.5}]
    recs += [{"step": s, "epoch": 0, "time": float(s), "total": 1.0 / s, "kl": 0.5, "eh": 2.0, "he": 2.1,
              "lr": 1e-4 * s} for s in (1, 2, 3)]
    fig, titles = curves_figure(recs, "t", monitor_every=3)
    assert titles == ["loss", "learning rate", "online kNN top-1 (%)"]
    fig.canvas.draw()
    loss, lr, monitor = fig.axes[:3]
    for ax in (loss, lr, monitor):
        ticks = [x for x in ax.get_xticks() if 0 <= x <= 3]
        assert len(ticks) >= 2 and all(float(x).is_integer() for x in ticks), ticks
    for ax in (loss, monitor):
        box, frame = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert box.x0 >= frame.x1, "legend inside the axes"
    notes = [x.get_text() for x in monitor.texts if "monitor ran" in x.get_text()]
    assert notes == ["monitor ran once (step 0)\nit runs every 3 epochs (train.monitor_every_epochs)\n"
                     "1 epoch logged; a curve needs 2 points"]
    assert not [x for x in loss.texts if "a curve needs" in x.get_text()]
    plt.close(fig)


def test_tensorboard_scalars_match_the_log(tiny_run):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tiny_run / "tensorboard"))
    acc.Reload()
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    for key in ("total", "kl", "lr", "samples_per_s", "ce", "threshold"):
        want = [(r["step"], r[key]) for r in log if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert len(got) == len(want) > 0, key
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-6)


def test_cluster_gallery(trained_ckpt, photo_data, tmp_path):
    import evaluate
    png, out = tmp_path / "clusters.png", tmp_path / "eval.json"
    assert evaluate.main(["cluster", "--checkpoint", str(trained_ckpt), "--gallery", str(png), "--out", str(out),
                          f"data.path={photo_data}", "data.workers=0"]) == 0
    rows = json.loads(out.read_text())["details"]["cluster"]["gallery"]["rows"]
    classes = {d.name for d in (photo_data / "val").iterdir()}
    assert 2 <= len(rows) <= 8
    sizes = [r["size"] for r in rows]
    assert sizes == sorted(sizes, reverse=True)
    for r in rows:
        assert len(r["samples"]) == min(10, r["size"]) and r["majority_name"] in classes and 0 < r["share"] <= 1
    per_row = max(len(r["samples"]) for r in rows)
    img = load_rgb(png)
    assert img.shape[:2] == (round((len(rows) * 0.9 + GALLERY_TOP + 0.1) * DPI),
                             round((per_row * 0.9 + 2.4) * DPI))
    # each row: its thumbnails hold pixels of many grey levels (photos), not a blank strip
    top = round(GALLERY_TOP * DPI)
    strip = (img.shape[0] - top) // len(rows)
    left = round(2.3 * DPI)
    for i, r in enumerate(rows):
        band = img[top + i * strip: top + (i + 1) * strip, left:]
        assert len(np.unique(band.reshape(-1, 3), axis=0)) > 200, f"gallery row {i} looks blank"
        assert band.std() > 20


def test_profile_plot_with_baseline(tiny_data, tmp_path, capsys):
    """--pipeline torch,pil profiles both in one call and draws them side by side, the pil baseline grey and
    hatched; --plot with --compare alone redraws saved results without profiling."""
    from tools.plots import draw_profile
    from tools.profiler import main as profile
    common = ["--config", "configs/demo.yaml", "--data", str(tiny_data), "--steps", "2", "--warmup", "1",
              "data.batch_size=8", "data.workers=0", "augment.global_size=32", "augment.local_size=16",
              "model.head_hidden=32", "model.head_dim=8"]
    assert profile([*common, "--pipeline", "torch,pil", "--json", str(tmp_path / "both.json"),
                    "--plot", str(tmp_path / "both.png")]) == 0
    runs = json.loads((tmp_path / "both.json").read_text())
    assert [r["pipeline"] for r in runs] == ["torch", "pil"]
    assert all(np.isfinite(stage_ms(r)).all() and min(stage_ms(r)) > 0 for r in runs)
    (tmp_path / "torch.json").write_text(json.dumps(runs[0]))
    assert profile(["--plot", str(tmp_path / "torch.png"), "--compare", str(tmp_path / "torch.json")]) == 0
    assert draw_profile(runs, tmp_path / "p.png") == ["time per stage (lower is better)",
                                                      "throughput (higher is better)"]
    size = (round((PANEL_H + 0.6) * DPI), round(2 * PANEL_W * DPI))
    single, both, again = (load_rgb(tmp_path / f"{n}.png") for n in ("torch", "both", "p"))
    assert single.shape[:2] == both.shape[:2] == size and np.array_equal(both, again)
    for img, baseline in ((single, False), (both, True)):
        for half in cells(img, 1, 2):
            assert has_colour(half, BLUE, min_pixels=50)                           # the torch backend's bars
            assert has_colour(half, (153, 153, 153), tol=0, min_pixels=1000) == baseline  # the grey baseline bars
    assert len(STAGES) == 5
    assert profile(["--plot", str(tmp_path / "x.png")]) == 2
    assert "--config is required" in capsys.readouterr().err


def fake_result(pipeline: str, scale: float) -> dict:
    return {"pipeline": pipeline, "device": "cpu (2 cores)", "batch_size": 8, "views": [32, 32],
            "loader_samples_per_s": 80 * scale, "forward_ms": 50 / scale, "backward_ms": 90 / scale,
            "optimizer_ms": 10.0, "model_samples_per_s": 40 * scale, "end_to_end_samples_per_s": 30 * scale}


def test_profile_figure_marks_the_baseline_and_keeps_the_legend_off_the_bars():
    from tools.plots import profile_figure
    plt = pytest.importorskip("matplotlib.pyplot")
    fig = profile_figure([fake_result("torch", 2.0), fake_result("pil", 1.0), fake_result("dali", 3.0)])
    title = fig._suptitle.get_text()
    assert title.startswith("torch, dali beside the baseline pil (grey, hatched)\n") and "batch 8" in title
    ax, ax2 = fig.axes
    legend = ax2.get_legend()
    assert [x.get_text() for x in legend.get_texts()] == ["pil (baseline)", "torch", "dali"]
    fig.canvas.draw()
    box, frame = legend.get_window_extent(), ax2.get_window_extent()
    assert box.x0 >= frame.x1 and ax.get_legend() is None          # outside the axes: covers no bar
    hatches = [b.get_hatch() for b in ax.patches]
    assert hatches == ["//"] * len(STAGES) + [None] * 2 * len(STAGES)  # baseline first in every group, hatched
    plt.close(fig)
    fig = profile_figure([fake_result("torch", 2.0)])
    assert "no baseline: add the pil loader" in fig._suptitle.get_text()
    plt.close(fig)


def test_cluster_gallery_title_says_how_many_of_how_many(tmp_path):
    """3 of the 5 head outputs predict images; with num_clusters=2 the title says '2 of 3 clusters' and that 2 of
    the 5 outputs are empty."""
    import torch
    from tools.image_grids import cluster_gallery, draw_gallery
    files = []
    for i in range(12):
        f = tmp_path / ("a" if i < 6 else "b") / f"{i}.png"
        f.parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(f)
        files.append(str(f))
    pred = torch.tensor([0] * 6 + [3] * 4 + [4] * 2)          # cluster sizes 6, 4, 2; outputs 1 and 2 empty
    logits = torch.nn.functional.one_hot(pred, 5).float() * 5
    labels = torch.tensor([0] * 6 + [1] * 6)
    rows = cluster_gallery(logits, labels, files, tmp_path / "g.png", num_clusters=2, per_row=3)
    assert [r["size"] for r in rows] == [6, 4]
    images = {i: Image.open(files[i]).convert("RGB") for r in (0, 6, 7) for i in [r]}
    title, *row_titles = draw_gallery([{"cluster": 0, "size": 6, "samples": [0]},
                                       {"cluster": 3, "size": 4, "samples": [6, 7]}], images, tmp_path / "h.png",
                                      title="t")
    assert title == "t" and row_titles == ["cluster 0, 6 images", "cluster 3, 4 images"]
    _, *row_titles = draw_gallery([{"cluster": 0, "size": 6, "samples": [0], "majority": 1, "share": 0.5}], images,
                                  tmp_path / "h.png", class_names=["a", "b"])
    assert row_titles == ["cluster 0, 6 images, majority b: 50%"]
    from tools.image_grids import gallery_title
    assert gallery_title(2, 3, 5, 12) == ("2 of 3 clusters (largest first; 2 of the head's 5 outputs predict no "
                                          "image) over 12 images:\nper cluster, the images the head is most "
                                          "confident about")
    assert gallery_title(8, 10, 10, 1000).startswith("8 of 10 clusters (largest first) over 1000 images")
    assert load_rgb(tmp_path / "g.png").shape[:2] == (round((2 * 0.9 + GALLERY_TOP + 0.1) * DPI),
                                                      round((3 * 0.9 + 2.4) * DPI))


def test_views_drawn_at_their_true_relative_sizes(tmp_path):
    """Every view's tile is as wide as its size times one common scale (a 16 px local is half a 32 px global);
    the columns are labelled; the PNG shows each tile's colour inside its box and white around it."""
    import torch
    from tools.image_grids import draw_views
    from tools.show_views import views_title
    from pipelines.spec import MultiCropSpec
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    originals = [torch.full((3, 24, 48), 128, dtype=torch.uint8) for _ in range(2)]
    red, blue = torch.tensor([1.0, -2.0, -2.0]), torch.tensor([-2.0, -2.0, 1.0])   # normalised: (0.75,0,0) etc.
    views = [red.view(1, 3, 1, 1).expand(2, 3, 32, 32)] * 2 + [blue.view(1, 3, 1, 1).expand(2, 3, 16, 16)] * 3
    layout = draw_views(originals, views, mean, std, tmp_path / "v.png", "title", num_global=2, cell=64)
    assert layout["labels"] == ["original 48x24 px\nfitted to the row", "global 1\n32 px", "global 2\n32 px",
                                "local 1\n16 px", "local 2\n16 px", "local 3\n16 px"]
    for row in layout["boxes"]:
        (_, _, ow, oh), *tiles = row
        assert (ow, oh) == (128, 64)                                   # 48x24 fitted to the 64 px row
        assert [(w, h) for _, _, w, h in tiles] == [(64, 64)] * 2 + [(32, 32)] * 3   # 16/32 of the globals
    img = load_rgb(tmp_path / "v.png")
    assert img.shape[:2] == layout["size"][::-1]
    for row in layout["boxes"]:
        for (x, y, w, h), rgb in zip(row[1:], [(191, 0, 0)] * 2 + [(0, 0, 191)] * 3):
            inside = img[y + 2:y + h - 2, x + 2:x + w - 2]
            assert (np.abs(inside - np.array(rgb)) <= 3).all()
            assert (img[y + h + 2:y + h + 4, x:x + w] == 255).all()                # white below a tile's box
    spec = MultiCropSpec.twist(224, 96, 6)
    assert views_title("rn50_multicrop", "dali", 3, spec) == (
        "recipe rn50_multicrop, dali backend, epoch 3: each row one image and its views\n"
        "2 global views of 224 px, 6 local views of 96 px, drawn at their true relative sizes")


def test_show_views_png(tiny_data, tmp_path, capsys, monkeypatch):
    import tools.show_views as sv
    seen = {}

    def spy(*args, **kw):
        seen.update(title=args[5], num_global=args[6])
        return draw(*args, **kw)
    draw = sv.draw_views
    monkeypatch.setattr(sv, "draw_views", spy)
    png = tmp_path / "views.png"
    assert sv.main(["--data", str(tiny_data), "--out", str(png), "--n", "3", "augment.global_size=32",
                       "augment.local_size=16", "augment.num_local=2"]) == 0
    assert "3 images x 4 views (torch backend)" in capsys.readouterr().out
    assert seen == {"title": "recipe demo, torch backend, epoch 0: each row one image and its views\n2 global "
                             "views of 32 px, 2 local views of 16 px, drawn at their true relative sizes",
                    "num_global": 2}
    img = load_rgb(png)
    assert img.shape[0] > 3 * 160 and img.shape[1] > 160 + 2 * 160 + 2 * 80
