"""torch.hub entry points, named as the official ones: 02_vit.py's backbone with the released weights.

    model = torch.hub.load("path/to/this/repository", "dino_vits16", source="local")  # pretrained=False: random

The weights come from the official URLs into torch.hub's cache (checkpoint.load_released).
Only the ViTs: the official ResNet-50 and XCiT entries are named, and say where to load them from.
"""
import importlib

import checkpoint as ckpt

dependencies = ["torch", "torchvision"]

OFFLINE = ("or build the model with pretrained=False and load that file into it: "
           "model.load_state_dict(torch.load(path, weights_only=True))")


def _released(name, pretrained, **kwargs):
    arch, patch_size, _ = ckpt.RELEASED[name]
    if pretrained and kwargs.get("patch_size", patch_size) != patch_size:  # the weights are for one patch size
        same = [n for n, (a, p, _) in ckpt.RELEASED.items() if (a, p) == (arch, kwargs["patch_size"])]
        raise ValueError(f"{name} was trained with patch_size={patch_size}, not {kwargs['patch_size']}; "
                         + (f"load {same[0]} instead, or " if same else "") + "pass pretrained=False for an untrained "
                         "network")
    kwargs.setdefault("patch_size", patch_size)
    model = importlib.import_module("02_vit").ARCHS[arch](**kwargs)
    if pretrained:
        ckpt.load_strict(model, ckpt.load_released(name, OFFLINE), name)
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


def _official_only(name):
    def entry(*args, **kwargs):
        raise ValueError(f"{name} is an official entry point that this repository does not implement (it has "
                         f"{', '.join(ckpt.RELEASED)}); load it from the official repository: "
                         f"torch.hub.load('facebookresearch/dino:main', '{name}')")
    entry.__doc__ = f"Not here: {name} is in the official repository only (an error that says so)."
    return entry


# torch.hub's own error for a name it cannot find says nothing more; these are the names users copy
dino_resnet50 = _official_only("dino_resnet50")
dino_xcit_small_12_p16 = _official_only("dino_xcit_small_12_p16")
dino_xcit_small_12_p8 = _official_only("dino_xcit_small_12_p8")
dino_xcit_medium_24_p16 = _official_only("dino_xcit_medium_24_p16")
dino_xcit_medium_24_p8 = _official_only("dino_xcit_medium_24_p8")
