"""The supervised baseline: the same network and views as train.py, learning from the labels."""
import torch

from conftest import load

supervised = load("supervised")
arguments = load("arguments")
knn = load("06_knn")
ckpt = load("checkpoint")

TINY = ["--arch", "vit_nano", "--patch_size", "8", "--global_size", "16", "--local_size", "8",
        "--local_crops_number", "2", "--batch_size_per_gpu", "4", "--epochs", "8", "--warmup_epochs", "1",
        "--num_workers", "0", "--precision", "fp32", "--lr", "5e-3"]


def test_it_learns_the_labels_and_writes_a_checkpoint_the_evaluators_read(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert supervised.main(arguments.parse_args(TINY + ["--data_path", str(folder), "--output_dir", str(out)])) == 0
    path = tmp_path / "run_supervised" / "checkpoint.pth"
    state = torch.load(path, weights_only=True)
    assert state["args"]["supervised"] and state["args"]["arch"] == "vit_nano"
    # the k-NN evaluation reads it as it reads a train.py checkpoint
    args = knn.get_args_parser().parse_args(["--checkpoint", str(path)])
    model, image_size, _ = knn.build_backbone(args)
    assert image_size == 16 and torch.equal(model.state_dict()["pos_embed"], state["teacher"]["pos_embed"])
    # the linear classifier on its CLS features fits the training labels: the backbone learned from them
    head = torch.nn.Linear(model.embed_dim, 2)
    head.load_state_dict(state["classifier"])
    ds = load("data").build_dataset(str(folder), "train", knn.eval_transform(16))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        assert (head(model.eval()(x)).argmax(1) == y).float().mean() >= 0.75
    assert "k-NN top-1 (k=20)" in capsys.readouterr().out
