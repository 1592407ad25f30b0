"""Online kNN monitor: how well the backbone's features separate a small labelled subset, during training.

Every `train.monitor_every_epochs`, rank 0 extracts centre-crop features of `train.monitor_bank` training images
(the kNN bank) and `train.monitor_queries` held-out images (from `train.monitor_split`, by default the
validation split when it exists, else training images outside the bank), in bf16 on a GPU (fp32 on a CPU), and
logs the weighted-kNN top-1 of the queries as `monitor_knn_top1`. A fresh run also logs it at step 0 (the network
at initialisation) beside `monitor_pixels_knn_top1`, the same kNN on the raw evaluation-view pixels: the two
references a curve must climb above before the features have learned anything (evaluate.py --baseline init,pixels
for the whole split). It uses the evaluation code
(`evaluation.features.extract`, `evaluation.metrics.knn_accuracy`) and its own random state: training continues with
exactly the losses it would have had without the monitor.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from engine.config import Config
from evaluation.baselines import PixelFeatures
from evaluation.features import extract
from evaluation.metrics import knn_accuracy
from engine.precision import resolve_precision


def split_exists(root: str | Path, split: str) -> bool:
    root = Path(root)
    return bool(split) and ((root / split).is_dir() or (root / f"{split}.txt").is_file())


class KnnMonitor:
    def __init__(self, cfg: Config, device: torch.device):
        from pipelines.sources import load_source
        t = cfg.train
        # label subsets are read by the torch backend (image folders and file lists), whatever feeds training
        self.cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend="torch"))
        self.device, self.k = device, t.monitor_k
        self.precision = resolve_precision("bf16" if device.type == "cuda" else "fp32", device)
        query_split = t.monitor_split or (cfg.data.val_split if split_exists(cfg.data.path, cfg.data.val_split)
                                          else "")
        try:
            _, train_labels = load_source(cfg.data.path, cfg.data.train_split)
            _, query_labels = load_source(cfg.data.path, query_split) if query_split else (None, None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"train.monitor_every_epochs: cannot list the labelled images under data.path "
                             f"'{cfg.data.path}' ({exc}); the monitor reads image folders or file lists — set "
                             f"train.monitor_split or train.monitor_every_epochs=0") from None
        g = torch.Generator().manual_seed(t.seed)
        perm = torch.randperm(len(train_labels), generator=g).tolist()
        self.bank = sorted(perm[:t.monitor_bank])
        if query_split:
            self.query_split = query_split
            self.queries = sorted(torch.randperm(len(query_labels), generator=g)[:t.monitor_queries].tolist())
        else:   # no validation split: held-out training images, disjoint from the bank
            self.query_split = cfg.data.train_split
            self.queries = sorted(perm[t.monitor_bank:t.monitor_bank + t.monitor_queries])
        if not self.queries:
            raise ValueError(f"train.monitor_bank={t.monitor_bank} leaves no held-out training images to query "
                             f"(the split has {len(train_labels)}); lower it or add a '{cfg.data.val_split}' split")
        self._pipes = None

    def _pipelines(self):
        from pipelines import build_pipeline
        if self._pipes is None:
            c = self.cfg
            self._pipes = tuple(build_pipeline(c, split, 0, 1, self.device, train=False, subset=subset)
                                for split, subset in ((c.data.train_split, self.bank),
                                                      (self.query_split, self.queries)))
        return self._pipes

    def __call__(self, model, pixels: bool = False) -> dict:
        """{'monitor_knn_top1': percent of the held-out queries the bank classifies right, 'monitor_seconds'}
        (and `monitor_pixels_knn_top1` with `pixels`); leaves `model` in eval mode. The sizes (bank, queries)
        are in `self.sizes` (constants: not logged)."""
        t0 = time.perf_counter()
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            bank, queries = (extract(model, pipe, self.device, with_head=False, show=False,
                                     precision=self.precision, scope="local") for pipe in self._pipelines())
            rec = {"monitor_knn_top1": self._knn(bank, queries)}
            if pixels:
                flat = PixelFeatures(self.cfg.eval.crop)
                rec["monitor_pixels_knn_top1"] = self._knn(*(extract(flat, pipe, self.device, with_head=False,
                                                                     show=False, scope="local")
                                                             for pipe in self._pipelines()))
        self.sizes = (int(bank["labels"].numel()), int(queries["labels"].numel()))
        return {**rec, "monitor_seconds": time.perf_counter() - t0}

    def _knn(self, bank: dict, queries: dict) -> float:
        acc = knn_accuracy(bank["features"], bank["labels"], queries["features"], queries["labels"], ks=(self.k,))
        return acc[f"knn_top1_k{self.k}"]
