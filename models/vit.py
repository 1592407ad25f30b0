"""timm's VisionTransformer with the two embedding details of the official TWIST vision_transformer.py.

- The position embedding is resized for other input sizes (the 96 px local crops) as the official
  `interpolate_pos_encoding` does: bicubic with scale_factor (grid + 0.1) / sqrt(N) and no antialiasing, left
  alone only at the native square grid. timm's `resample_abs_pos_embed` resizes to the target size with
  antialiasing: at 96 px its outputs differ from the official model's by ~3e-2 (relative).
- The class token starts trunc_normal(std 0.02) (timm: normal(std 1e-6)).

Everything else, parameter names included, is timm's `vit_*_patch16_224`, so exported weights load into
`timm.create_model(...)` unchanged. Input sides must be multiples of the patch size (timm's patch embedding
asserts it); there the official test `npatch == N and w == h` is "the grid is the native square one".
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


class OfficialEmbedViT(VisionTransformer):
    def __init__(self, **kwargs):
        super().__init__(dynamic_img_size=True, class_token=True, reg_tokens=0, no_embed_class=False, **kwargs)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def resized_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """The position embedding (1, 1 + rows*cols, dim) for a rows x cols patch grid."""
        n = self.pos_embed.shape[1] - 1
        if rows * cols == n and rows == cols:
            return self.pos_embed
        side, dim = math.sqrt(n), self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        return torch.cat((self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)), dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: the patch embedding, (B, rows, cols, dim) (timm's NHWC layout under dynamic_img_size)."""
        b, rows, cols, dim = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x.reshape(b, rows * cols, dim)), dim=1)
        return self.pos_drop(x + self.resized_pos_embed(rows, cols))
