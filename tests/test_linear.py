"""08_linear.py, the released weights by name and the torch.hub entry points; all offline."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, load, make_image_folder

lin = load("08_linear")
knn = load("06_knn")
att = load("07_attention")
vits = load("02_vit")
ckpt = load("checkpoint")
cli = load("cli")
data = load("data")

CLASSES = (0, 2, 3, 4, 6)  # hstripes, checker, dots, rings, diagonals


def linear_args(*argv):
    return lin.get_args_parser().parse_args(list(argv) + ["--num_workers", "0"])


def test_features_are_the_cls_tokens_of_the_last_blocks():
    torch.manual_seed(0)
    model = vits.vit_nano(patch_size=8, img_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    z = lin.features(model, x, 4, avgpool=False)
    assert z.shape == (3, 4 * 128)
    assert torch.allclose(z[:, -128:], model(x), atol=1e-6)  # the last block's CLS is the model's own feature
    z = lin.features(model, x, 1, avgpool=True)
    last = model.get_intermediate_layers(x, 1)[0]  # (B, N, D)
    assert torch.allclose(z, torch.cat((last[:, 0], last[:, 1:].mean(1)), dim=1))
    layer = lin.LinearClassifier(1000, 10000).linear
    assert abs(layer.weight.std().item() - 0.01) < 1e-4 and not layer.bias.any()


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    """A 5-class folder, and a checkpoint (in train.py's format) of a vit_nano trained with labels on other
    images of the same classes: features known to be better than random ones, in seconds."""
    root = tmp_path_factory.mktemp("linear")
    folder = make_image_folder(root / "data", CLASSES, {"train": 8, "val": 10})
    tf, rng = knn.eval_transform(32), np.random.RandomState(1)
    y = torch.arange(len(CLASSES)).repeat(40)
    x = torch.stack([tf(data.draw_texture(rng, CLASSES[i], 32)) for i in y])  # (200, 3, 32, 32)
    torch.manual_seed(0)
    net, head = vits.vit_nano(patch_size=8, img_size=32), torch.nn.Linear(128, len(CLASSES))
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], 2e-3)
    for _ in range(50):
        idx = torch.randint(len(y), (32,))
        loss = F.cross_entropy(head(net(x[idx])), y[idx])
        opt.zero_grad(), loss.backward(), opt.step()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()},
                "args": {"arch": "vit_nano", "patch_size": 8, "global_size": 32}}, root / "checkpoint.pth")
    return folder, root / "checkpoint.pth"


@pytest.mark.parametrize("precomputed", [True, False])
def test_linear_probe_trained_beats_random_init(probe_data, tmp_path, precomputed):
    """Both modes rank the features the same way: trained above random (here 70-84 % against 38-46 %)."""
    folder, trained = probe_data
    common = ["--data_path", str(folder), "--output_dir", str(tmp_path / "out"), "--epochs", "30",
              "--batch_size_per_gpu", "8", "--lr", "1.0"] + (["--precomputed"] if precomputed else [])
    lin.main(linear_args("--checkpoint", str(trained), *common))
    lin.main(linear_args("--random_init", "--arch", "vit_nano", "--patch_size", "8", "--image_size", "32", *common))
    ours, rand = (json.loads((tmp_path / "out" / f).read_text()) for f in ("linear.json", "linear_random_init.json"))
    assert ours["precomputed"] == precomputed and ours["n_last_blocks"] == 4 and not ours["avgpool_patchtokens"]
    assert ours["top1"] >= rand["top1"] + 15, (ours, rand)


def test_linear_cli_end_to_end_and_bad_input(probe_data, tmp_path, capsys):
    folder, trained = probe_data
    r = subprocess.run([sys.executable, "08_linear.py", "--checkpoint", str(trained), "--data_path", str(folder),
                        "--precomputed", "--epochs", "2", "--num_workers", "0"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("linear top-1: ") and last.endswith("%")
    assert json.loads((trained.parent / "linear.json").read_text())["top1"] == float(last.split()[-1][:-1])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for extra, expected in ((["--n_last_blocks", "7"], "--n_last_blocks 7 exceeds the 6 blocks of vit_nano"),
                            (["--epochs", "0"], "--epochs: expected an integer >= 1"),
                            (["--data_path", str(tmp_path / "nothing")], "neither a directory"),
                            (["--checkpoint", str(blocker)], "is not a PyTorch checkpoint"),
                            (["--output_dir", str(blocker / "o")], "cannot write to")):
        argv = ["--checkpoint", str(trained), "--data_path", str(folder), "--output_dir", str(tmp_path / "o")] + extra
        assert cli.run(lin.main, lin.get_args_parser().parse_args, argv + ["--num_workers", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


def released_file(path, arch="vit_small", patch_size=16):
    """A file in the released format: a bare backbone state dict (random weights)."""
    torch.manual_seed(0)
    model = vits.ARCHS[arch](patch_size=patch_size).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def test_released_name_downloads_once_into_the_hub_cache(tmp_path, monkeypatch, capsys):
    source = tmp_path / "server" / "dino_deitsmall16_pretrain.pth"
    model = released_file(source)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(ckpt.RELEASED, "dino_vits16", ("vit_small", 16, source.as_uri()))
    sd = ckpt.load_released("dino_vits16")
    assert (tmp_path / "home" / "hub" / "checkpoints" / source.name).is_file()
    source.unlink()  # from now on only the cache has it
    assert all(torch.equal(sd[k], v) for k, v in ckpt.load_released("dino_vits16").items())
    # every CLI takes the name; the architecture and patch size follow from it
    folder = make_image_folder(tmp_path / "data", (0, 1), {"train": 3, "val": 2})
    common = ["--pretrained", "dino_vits16", "--image_size", "32", "--output_dir", str(tmp_path / "o")]
    args = knn.get_args_parser().parse_args(common + ["--data_path", str(folder), "--num_workers", "0",
                                                      "--arch", "vit_tiny", "--patch_size", "8"])
    knn.main(args)
    assert (args.arch, args.patch_size) == ("vit_small", 16)
    lin.main(linear_args(*common, "--data_path", str(folder), "--precomputed", "--epochs", "1"))
    att.main(att.get_args_parser().parse_args(common))
    assert {"knn.json", "linear.json", "attention.png"} <= {p.name for p in (tmp_path / "o").iterdir()}
    x = torch.randn(1, 3, 64, 64)
    net = knn.build_backbone(args)[0].eval()
    with torch.no_grad():
        assert torch.equal(net(x), model(x))


def test_released_name_offline_is_one_error_line(tmp_path, folder):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "home"), HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9")  # a closed port: offline, whatever the network
    r = subprocess.run([sys.executable, "08_linear.py", "--pretrained", "dino_vits8", "--data_path", str(folder),
                        "--output_dir", str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    url = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
    cached = tmp_path / "home" / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth"
    assert r.returncode == 2 and r.stderr.startswith(f"error: cannot download {url}"), r.stderr
    assert f"put it at {cached}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not cached.exists()


def test_hub_entry_points(tmp_path, monkeypatch):
    hubconf = load("hubconf")
    assert hubconf.dependencies == ["torch", "torchvision"] and all(hasattr(hubconf, n) for n in ckpt.RELEASED)
    for name, (arch, patch, _) in ckpt.RELEASED.items():
        if arch == "vit_small":  # the ViT-B ones are built the same way, at 4x the cost
            model = torch.hub.load(str(ROOT), name, source="local", pretrained=False)
            assert model.embed_dim == 384 and model.patch_embed.patch_size == patch
    # a weights file placed in the hub cache, as the offline error says: no download needed
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    model = released_file(tmp_path / "home" / "hub" / "checkpoints" / "dino_deitsmall16_pretrain.pth")
    loaded = torch.hub.load(str(ROOT), "dino_vits16", source="local").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
