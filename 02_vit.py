"""Vision Transformer backbone (paper Sec. 3.1 "Implementation and evaluation protocols";
Dosovitskiy et al. 2021), as in the official `vision_transformer.py`.

    z_0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos          patches of p x p pixels, linear embedding E
    z'_l = z_{l-1} + MSA(LN(z_{l-1}))                        pre-norm blocks
    z_l  = z'_l + MLP(LN(z'_l))
    y    = LN(z_L^0)                                          the final-normed CLS token is the feature

Official defaults: tiny 192 / 12 blocks / 3 heads, small 384 / 12 / 6, base 768 / 12 / 12;
MLP ratio 4, qkv bias, LayerNorm eps 1e-6, stochastic depth growing linearly 0 -> drop_path_rate,
trunc-normal(0.02) init. State-dict keys are the official ones, so the released backbones load
with strict=True.

Departures:
- Attention runs through F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU);
  the explicit softmax is computed only where the attention matrix is wanted
  (get_last_selfattention), and where train.py sets `fused = False` (--reference_mode; bf16 on a
  CPU, where it is faster). Same maths, same weights.
- The patch embedding keeps the official convolution's weights but runs as a matrix product.
- No classifier head and no dropout: DINO uses neither.

Shapes: B batch, N tokens (1 + patches), D width, H heads.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """Stochastic depth: drop a whole residual branch per sample, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = (keep_prob + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep_prob) * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # False: the official explicit-softmax computation (train.py --reference_mode)

    def forward(self, x, return_attention=False):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if self.fused and not return_attention:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H), never forms the N x N matrix
        else:
            # softmax(q k^T / sqrt(d)) written out, for when the matrix itself is wanted
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
            if return_attention:
                return attn
            x = attn @ v  # (B, H, N, D/H)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, return_attention=False):
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and embed each linearly: x_p E."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        # E is stored as the official stride-p convolution (same weights, same keys)...
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.fused = True  # False: run the convolution itself (train.py --reference_mode)

    def forward(self, x):
        p = self.patch_size
        if not self.fused:
            return rearrange(self.proj(x), "b d h w -> b (h w) d")
        # ...but applied as one matrix product over flattened patches: the same numbers, and on GPU
        # in bf16 faster than the convolution kernel
        h, w = x.shape[-2] // p, x.shape[-1] // p
        patches = rearrange(x[..., :h * p, :w * p], "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, N-1, D)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=False, drop_path_rate=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer) for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, npatch, h, w):
        """E_pos resized bicubically to the patch grid of an h x w image (96 px local crops, any aspect)."""
        n = self.pos_embed.shape[1] - 1
        if npatch == n and h == w:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(math.sqrt(n))
        h0, w0 = h // self.patch_embed.patch_size, w // self.patch_embed.patch_size
        # As the official code: a scale factor, nudged by 0.1 so that floor(side * scale) cannot
        # round down to one patch too few. The scale (not the size) sets the sampling grid.
        patch_pos = F.interpolate(
            rearrange(patch_pos, "1 (gh gw) d -> 1 d gh gw", gh=side),
            scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side),
            mode="bicubic",
        )
        assert patch_pos.shape[-2:] == (h0, w0)
        return torch.cat((cls_pos, rearrange(patch_pos, "1 d gh gw -> 1 (gh gw) d")), dim=1)

    def prepare_tokens(self, x):
        B, _, h, w = x.shape
        x = self.patch_embed(x)  # (B, N-1, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, N, D)
        return x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]  # (B, D)

    def get_last_selfattention(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)  # (B, H, N, N)

    def get_intermediate_layers(self, x, n=1):
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))  # (B, N, D)
        return out


def _vit(embed_dim, depth, num_heads, patch_size, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_nano(patch_size=4, **kwargs):
    """Not in the paper: a 6-block, 128-wide ViT small enough to train on a laptop CPU (course preset)."""
    return _vit(128, 6, 4, patch_size, **kwargs)


def vit_tiny(patch_size=16, **kwargs):
    return _vit(192, 12, 3, patch_size, **kwargs)


def vit_small(patch_size=16, **kwargs):
    return _vit(384, 12, 6, patch_size, **kwargs)


def vit_base(patch_size=16, **kwargs):
    return _vit(768, 12, 12, patch_size, **kwargs)


ARCHS = {"vit_nano": vit_nano, "vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


if __name__ == "__main__":
    for name, fn in ARCHS.items():
        for p in ((16, 8) if name != "vit_nano" else (16,)):
            model = fn(patch_size=p).eval()
            n_params = sum(t.numel() for t in model.parameters())
            with torch.no_grad():
                g, l = model(torch.randn(2, 3, 224, 224)), model(torch.randn(2, 3, 96, 96))
            print(f"{name}/{p}: {n_params / 1e6:.1f}M params, tokens 224px={1 + (224 // p) ** 2} "
                  f"96px={1 + (96 // p) ** 2}, features {tuple(g.shape)} {tuple(l.shape)}")
    model = vit_small(patch_size=16).eval()
    with torch.no_grad():
        attn = model.get_last_selfattention(torch.randn(1, 3, 224, 320))
    print(f"non-square 224x320 input: last attention {tuple(attn.shape)}, rows sum to {attn.sum(-1).mean():.4f}")
