"""torch.hub entry points, named as the official ones: 02_vit.py's backbone with the released weights.

    model = torch.hub.load("path/to/this/repository", "dino_vits16", source="local")  # pretrained=False: random

The weights come from the official URLs into torch.hub's cache (checkpoint.load_released).
Only the ViTs: no ResNet-50, XCiT or linear-classifier entries.
"""
import importlib

import checkpoint as ckpt

dependencies = ["torch", "torchvision"]


def _released(name, pretrained, **kwargs):
    arch, patch_size, _ = ckpt.RELEASED[name]
    model = importlib.import_module("02_vit").ARCHS[arch](patch_size=patch_size, **kwargs)
    if pretrained:
        ckpt.load_strict(model, ckpt.load_released(name), name)
    return model


def dino_vits16(pretrained=True, **kwargs):
    """ViT-S/16, 21M parameters (ImageNet k-NN 74.5 %, linear 77.0 %)."""
    return _released("dino_vits16", pretrained, **kwargs)


def dino_vits8(pretrained=True, **kwargs):
    """ViT-S/8, 21M parameters (ImageNet k-NN 78.3 %, linear 79.7 %)."""
    return _released("dino_vits8", pretrained, **kwargs)


def dino_vitb16(pretrained=True, **kwargs):
    """ViT-B/16, 85M parameters (ImageNet k-NN 76.1 %, linear 78.2 %)."""
    return _released("dino_vitb16", pretrained, **kwargs)


def dino_vitb8(pretrained=True, **kwargs):
    """ViT-B/8, 85M parameters (ImageNet k-NN 77.4 %, linear 80.1 %)."""
    return _released("dino_vitb8", pretrained, **kwargs)
