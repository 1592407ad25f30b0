import io

import pytest
import torch
from PIL import Image

from pipelines.batch import EncodedImages
from pipelines.gpu_decode import DevicePrefetcher, decode_batch, jpeg_components
from pipelines.sources import decode_rgb
from pipelines.sources import ImageDataset
from pipelines.torch_backend import TorchPipeline, cap_size
from pipelines import build_pipeline
from tests.conftest import tiny_config


def encode(mode, size=(20, 12), fmt="JPEG", **kw):
    img = Image.new(mode, size)
    img.putdata([tuple((x * 7 + k * 40) % 256 for k in range(len(mode))) if len(mode) > 1 else (x * 7) % 256
                 for x in range(size[0] * size[1])])
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_jpeg_components_reads_the_frame_header():
    assert jpeg_components(encode("RGB")) == 3
    assert jpeg_components(encode("RGB", progressive=True)) == 3
    assert jpeg_components(encode("L")) == 1
    assert jpeg_components(encode("CMYK")) == 4
    assert jpeg_components(encode("RGB", fmt="PNG")) == 0
    assert jpeg_components(torch.tensor([0xFF, 0xD8, 0xFF], dtype=torch.uint8)) == 0
    assert jpeg_components(b"") == 0


def test_decode_batch_mixed_inputs_match_cpu_decode():
    datas = [encode("RGB"), encode("L"), encode("CMYK"), encode("RGB", fmt="PNG"), encode("RGB", progressive=True)]
    out = decode_batch(datas, torch.device("cpu"))
    assert len(out) == len(datas)  # nothing dropped
    for d, img in zip(datas, out):
        ref = decode_rgb(bytes(d.numpy()))
        assert img.shape == ref.shape == (3, 12, 20) and img.dtype == torch.uint8
        assert (img.int() - ref.int()).abs().max() <= 2


def test_decode_batch_names_the_broken_file():
    with pytest.raises(ValueError, match="bad.JPEG"):
        decode_batch([encode("RGB"), torch.tensor([1, 2, 3], dtype=torch.uint8)], torch.device("cpu"),
                     ["ok.JPEG", "bad.JPEG"])


def test_prefetcher_keeps_order_and_everything():
    seen = list(DevicePrefetcher(range(5), lambda i: i * 10, torch.device("cpu")))
    assert seen == [0, 10, 20, 30, 40]
    assert list(DevicePrefetcher([], lambda i: i, torch.device("cpu"))) == []


def test_cap_size_downscales_only_large_images():
    small, big = torch.zeros(3, 40, 30, dtype=torch.uint8), torch.full((3, 300, 100), 9, dtype=torch.uint8)
    out = cap_size([small, big], 150)
    assert out[0] is small and out[1].shape == (3, 150, 50) and int(out[1].float().mean().round()) == 9
    assert cap_size([big], 0)[0] is big


def bytes_path(data, tmp_path, workers: int):
    """(the CPU worker path's train pipeline, the bytes path's on the same files, order and augmentation): with
    the bytes path the workers only read bytes and the main process decodes in batches (the GPU path, on CPU)."""
    ref = build_pipeline(tiny_config(data, tmp_path), "train")
    ds = ImageDataset(ref.dataset.files, ref.dataset.labels, decode=False)
    return ref, TorchPipeline(ds, ref.sampler, ref.batch_size, workers, torch.device("cpu"), ref.augment, True,
                              True, ref.seed, 0, max_side=0)


def test_bytes_path_gives_the_same_views_as_the_worker_path(tiny_data, tmp_path):
    """Reading bytes and decoding in the main process (the GPU path, exercised here on CPU) yields exactly the
    views the CPU worker path yields for the same seed."""
    ref, dev = bytes_path(tiny_data, tmp_path, workers=0)
    ref.set_epoch(1)
    ref_batches = list(ref)[:2]
    dev.set_epoch(1)
    for a, b in zip(ref_batches, dev):
        assert torch.equal(a.indices, b.indices)
        for va, vb in zip(a.views, b.views):
            assert torch.allclose(va, vb, atol=1e-5)


def test_encoded_images_pack_and_split_round_trip():
    items = [encode("RGB"), encode("L"), torch.tensor([7], dtype=torch.uint8), encode("RGB", fmt="PNG")]
    packed = EncodedImages.pack(items)
    assert packed.data.dim() == 1 and packed.data.numel() == sum(t.numel() for t in items)
    assert packed.offsets.tolist()[0] == 0 and len(packed) == 4
    parts = packed.split()
    assert all(torch.equal(a, b) for a, b in zip(parts, items))
    assert {p.untyped_storage().data_ptr() for p in parts} == {packed.data.untyped_storage().data_ptr()}


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, EncodedImages):
        return [obj.data, obj.offsets]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def test_encoded_batch_crosses_the_worker_boundary_as_one_tensor(tiny_data, tmp_path):
    """With decoding on the device, a worker's batch reaches the main process as one flat byte tensor (plus
    offsets, labels, indices: four tensors, whatever the batch size), and decodes to exactly the images the
    files decode to."""
    ref, pipe = bytes_path(tiny_data, tmp_path, workers=1)
    ds = pipe.dataset
    pipe.set_epoch(0)
    payload, labels, idx, skipped = item = next(iter(pipe._loader()))
    assert isinstance(payload, EncodedImages) and len(payload) == ref.batch_size and skipped == []
    assert len(_tensors(item)) == 4
    got = decode_batch(payload.split(), torch.device("cpu"))
    for i, img in zip(idx.tolist(), got):
        with open(ds.files[i], "rb") as f:
            assert torch.equal(img, decode_rgb(f.read()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_matches_cpu_decode():
    datas = [encode("RGB", (64, 48)), encode("L", (64, 48)), encode("CMYK", (64, 48)),
             encode("RGB", (64, 48), fmt="PNG")]
    out = decode_batch(datas, torch.device("cuda"))
    for d, img in zip(datas, out):
        ref = decode_rgb(bytes(d.numpy()))
        assert img.is_cuda and img.shape == ref.shape
        assert (img.cpu().int() - ref.int()).abs().float().mean() < 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_waits_for_queued_reads_of_recycled_memory():
    """nvJPEG writes from its own stream into memory allocated on the caller's stream. A block just freed there
    while a read of it is still queued (a delayed kernel) must not be overwritten before that read runs."""
    dev = torch.device("cuda", torch.cuda.current_device())
    datas = [encode("RGB", (64, 48)) for _ in range(4)]
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        ref = [t.clone() for t in decode_batch(datas, dev)]
        for _ in range(5):
            x = torch.zeros(3 * 48 * 64, dtype=torch.uint8, device=dev)   # the size of one decoded image
            torch.cuda._sleep(20_000_000)                                  # delay the queued read
            total = x.sum(dtype=torch.int64)
            del x                                                          # freed with its read still queued
            out = decode_batch(datas, dev)
            assert total.item() == 0
            assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_bytes_path_reports_and_replaces_bad_files_mid_epoch(tiny_data, tmp_path, monkeypatch):
    """The GPU-decode path (bytes from the workers, batched decode in the main process), run on the CPU: a JPEG
    the batched decoder rejects, a CMYK JPEG, a PNG named .JPEG and a file truncated mid-epoch. The first three
    decode (by retry or by content), the truncated one is reported with its path and replaced; the epoch
    completes with full batches."""
    import shutil
    import pipelines.gpu_decode as gd
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    files = sorted((data / "train").rglob("*.jpg"))
    photo = Image.open(files[0]).convert("RGB")
    photo.convert("CMYK").save(files[1], "JPEG")
    photo.save(files[2], "PNG")
    rejected = files[3].read_bytes()
    victim = files[4]
    victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
    real, refusals = gd.decode_jpeg, []

    def picky(data, **kw):                 # the batched decoder rejects one file, as nvJPEG may
        items = data if isinstance(data, list) else [data]
        if any(bytes(d.numpy()) == rejected for d in items):
            refusals.append(len(items))
            raise RuntimeError("unsupported JPEG")
        return real(data, **kw)
    monkeypatch.setattr(gd, "decode_jpeg", picky)
    ref, pipe = bytes_path(data, tmp_path, workers=0)
    pipe.set_epoch(0)
    batches = list(pipe)
    assert len(batches) == len(pipe) and all(len(b) == ref.batch_size for b in batches)
    assert all(torch.isfinite(v).all() for b in batches for v in b.views)
    assert refusals[0] > 1 and refusals[-1] == 1     # the batch failed, then the file alone
    skipped = [(path, reason) for b in batches for path, reason in b.skipped]   # for the trainer to report
    assert [path for path, _ in skipped] == [str(victim)] and "could not be decoded" in skipped[0][1]
    for ok in files[1:4]:
        assert str(ok) not in dict(skipped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_batch_reports_a_truncated_file():
    good, cut = encode("RGB", (64, 48)), encode("RGB", (64, 48), progressive=True)
    cut = cut[:cut.numel() // 2].clone()
    seen = []
    out = decode_batch([good, cut, encode("L", (64, 48))], torch.device("cuda"), ["a.JPEG", "cut.JPEG", "c.JPEG"],
                       on_error=lambda name, exc: seen.append(name))
    assert seen == ["cut.JPEG"] and len(out) == 3 and all(o.is_cuda and o.shape == (3, 48, 64) for o in out)
