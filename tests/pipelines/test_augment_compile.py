"""The compiled engine on batches of ImageNet-like, varying image sizes: a small, bounded number of graphs.

On a GPU each graph is an Inductor compilation (tens of seconds), and dynamo stops a `fullgraph` function at its
recompile limit: a shape that changes every batch would compile for minutes and then fail. The graphs are counted
here with dynamo's `CompileCounter` backend (dynamo's tracing and guards exactly as on the GPU, the graph then run
eagerly on the CPU)."""
import torch
from torch._dynamo.testing import CompileCounter

import pipelines.augment.engine as engine
from pipelines.augment.engine import MultiCropAugment
from pipelines.spec import MultiCropSpec

# ImageNet's most common sizes (h, w), a quarter of their side: views are 224/4 and 96/4 px, so the crops
# need the same filter taps (ratio image / view) as at full size.
SIZES = [(94, 125), (125, 94), (83, 125), (125, 83), (125, 125), (112, 150), (100, 133)]


def batches(n_batches: int, batch: int, last: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for b in range(n_batches):
        n = last if b == n_batches - 1 else batch                   # a short last batch
        picks = torch.randint(len(SIZES), (n,), generator=g).tolist()
        jitter = torch.randint(-6, 7, (n, 2), generator=g).tolist()   # not only the common sizes
        yield [torch.randint(0, 256, (3, SIZES[p][0] + j[0], SIZES[p][1] + j[1]), generator=g, dtype=torch.uint8)
               for p, j in zip(picks, jitter)]


def test_compiled_engine_makes_one_graph_per_static_shape_and_none_after_warm_up(monkeypatch):
    spec = MultiCropSpec.twist(global_size=56, local_size=24, num_local=2)   # both view resolutions
    counter = CompileCounter()
    aug = MultiCropAugment(spec, compile=True, use_triton=False, backend=counter)
    keys, real = [], engine.tap_counts

    def tap_counts(boxes, size, bucket=False):    # records what a graph is specialised on besides its group
        keys.append((size, boxes.shape[0], real(boxes, size, bucket))) if bucket else None
        return real(boxes, size, bucket)
    monkeypatch.setattr(engine, "tap_counts", tap_counts)
    eager = MultiCropAugment(spec, compile=False, use_triton=False)
    data = list(batches(30, 12, 5))
    sizes = set()
    for i, images in enumerate(data):
        views = aug(images, torch.Generator().manual_seed(i))
        sizes.add(sum(im.numel() for im in images))
        assert [v.shape[-1] for v in views] == spec.view_sizes() and views[0].shape[0] == len(images)
        if i in (0, 29):          # the same views as the eager engine (fp32 both: only summation order differs)
            for a, b in zip(views, eager(images, torch.Generator().manual_seed(i))):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert len(sizes) == 30                               # the images' buffer had 30 different lengths ...
    groups = len(spec.groups)
    distinct = {(i % groups, *k) for i, k in enumerate(keys)}
    assert counter.frame_count == len(distinct)          # ... and made no graph of its own: one per static shape
    assert counter.frame_count <= 4 * groups             # bucketed taps and widths: few shapes per group
    seen = counter.frame_count
    for i, images in enumerate(data):                   # the same batches again: no graph is added
        aug(images, torch.Generator().manual_seed(i))
    assert counter.frame_count == seen

