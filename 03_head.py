"""The DINO projection head and the multi-crop forward (paper Sec. 3.1, Appendix "Projection head").

    g(x) = W_K^T  l2norm( MLP(f(x)) )         f: backbone CLS feature, MLP: D -> 2048 -> 2048 -> 256
    W_K  = g * v / ||v||                      weight-normalised prototypes, one row per k = 1..K

The last layer holds K prototypes; normalising their rows (g frozen at 1, `norm_last_layer`) keeps
any one prototype from growing to win every softmax, which the authors found stabilises training.

Official defaults: nlayers 3, hidden 2048, bottleneck 256, GELU, no BatchNorm (ViT), K = 65536,
trunc-normal(0.02) init for the MLP, the default nn.Linear init for the prototypes. Keys mlp.0/2/4,
last_layer.weight_g, last_layer.weight_v, as in the official head, so its weights load.

Departure: the weight normalisation is written out (W = g v / ||v||) instead of through the
deprecated torch.nn.utils.weight_norm; the parameters and their names are the same.

Shapes: B batch, V views/crops, D width, K prototypes.
"""
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are g_k * v_k / ||v_k||."""

    def __init__(self, in_dim, out_dim, norm_last_layer=True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        # g = 1 makes every prototype a unit vector; frozen, it stays one
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    @property
    def weight(self):
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)  # (K, bottleneck)

    def forward(self, x):
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers += [nn.BatchNorm1d(b), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = nn.Sequential(*layers) if nlayers > 1 else layers[0]  # official keys: mlp.weight when 1 layer
        self.mlp.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.mlp(x)  # (B, bottleneck)
        x = F.normalize(x, dim=-1, p=2)  # onto the unit sphere, so logits are cosines scaled by g
        return self.last_layer(x)  # (B, K)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops: the backbone runs once per resolution (2 x 224 together,
    then all 96 px crops together), the head once on everything. Output rows are ordered view by
    view, [g1 batch; g2 batch; l1 batch; ...], which is what DINOLoss chunks."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops):
        if torch.is_tensor(crops):
            crops = [crops]
        feats = [self.backbone(torch.cat(list(group)))  # (V_res * B, D)
                 for _, group in itertools.groupby(crops, key=lambda c: c.shape[-2:])]
        return self.head(torch.cat(feats))  # (V * B, K)


if __name__ == "__main__":
    head = DINOHead(in_dim=384, out_dim=65536)
    n_mlp = sum(p.numel() for p in head.mlp.parameters())
    n_last = sum(p.numel() for p in head.last_layer.parameters() if p.requires_grad)
    print(f"DINOHead(384 -> 65536): MLP {n_mlp / 1e6:.2f}M, prototypes {n_last / 1e6:.2f}M trainable "
          f"(ViT-S itself is 21.7M)")
    print("state-dict keys:", [k for k in head.state_dict()])
    out = head(torch.randn(4, 384))
    row_norms = head.last_layer.weight.norm(dim=1)
    print(f"output {tuple(out.shape)}; prototype norms {row_norms.min():.4f}..{row_norms.max():.4f}; "
          f"|logit| <= 1 since both sides are unit vectors: max {out.abs().max():.4f}")
