"""The ViT backbone against float64 transcriptions of the official TWIST vision_transformer.py (bytedance/TWIST
796d36e): the position embedding resized as `interpolate_pos_encoding` does (bicubic at scale (w0+0.1)/sqrt(N), no
antialiasing) at the 96 px local crops and anywhere else, and the class token drawn as officially."""
import math

import pytest
import torch
import torch.nn as nn

from models.backbones import build_backbone


def interpolate_pos_encoding(self, x, w, h):
    """vision_transformer.py L176-196, VisionTransformer.interpolate_pos_encoding; `self` is the project's ViT
    (pos_embed (1, N+1, dim); timm's patch_embed.patch_size is a pair, the official one an int: [0])."""
    npatch = x.shape[1] - 1
    N = self.pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return self.pos_embed
    class_pos_embed = self.pos_embed[:, 0]
    patch_pos_embed = self.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // self.patch_embed.patch_size[0]
    h0 = h // self.patch_embed.patch_size[0]
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode='bicubic',
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def prepare_tokens(self, x):
    """vision_transformer.py L198-209 (PatchEmbed.forward L122-125: proj, flatten(2), transpose(1, 2))."""
    B, nc, w, h = x.shape
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    cls_tokens = self.cls_token.expand(B, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    x = x + interpolate_pos_encoding(self, x, w, h)
    return self.pos_drop(x)


def official_forward(net, x):
    """vision_transformer.py L211-219 (classification=False) with the project's blocks and final norm, which equal
    the official Block/LayerNorm(eps 1e-6) at 224 px to float64 rounding."""
    x = prepare_tokens(net, x)
    for blk in net.blocks:
        x = blk(x)
    x = net.norm(x)
    return x[:, 0]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    net, _ = build_backbone("vit_small", depth=2)
    with torch.no_grad():   # a position embedding with structure at every scale, so resizing errors show
        net.pos_embed.normal_(0, 1)
    return net.double().eval()


@pytest.mark.parametrize("size", [(96, 96), (224, 224), (160, 160), (224, 240), (112, 208)])
def test_outputs_equal_the_official_model_at_every_input_size(vit, size):
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours, ref = vit(x), official_forward(vit, x)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-10, f"{size}: relative difference {rel:.2e}"


def test_class_token_starts_trunc_normal_std_002():
    """vision_transformer.py L156: trunc_normal_(self.cls_token, std=.02) (timm draws normal(std 1e-6))."""
    torch.manual_seed(0)
    net, _ = build_backbone("vit_small", depth=1)
    cls = net.cls_token.detach()
    assert abs(cls.std().item() - 0.02) < 0.004 and cls.abs().max() <= 2.0


def test_state_dict_is_timms_for_export():
    import timm
    net, _ = build_backbone("vit_small", depth=2)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), net.eval()(x))   # the native size needs no resizing
