"""The course preset learns on real photographs it was never tuned for: a short run on crops of the
photographs that ship with matplotlib, scikit-image and scikit-learn beats the same network at random init
by a clear margin."""
import torch

from conftest import load

train, makers, knn, vits, ckpt = load("train"), load("makers"), load("06_knn"), load("02_vit"), load("checkpoint")


def test_course_preset_beats_random_init_on_real_photographs(tmp_path):
    folder = tmp_path / "photos"
    makers._write_crops(makers._photos(), folder, 80, (0.15, 0.45), "jpg")  # 704 training, 176 validation crops
    argv = ["--preset", "cpu_course", "--data_path", str(folder), "--output_dir", str(tmp_path / "run"),
            "--steps", "240", "--eval_every", "0"]  # a sixth of the preset's budget: 1-2 minutes on 2 cores
    assert train.main(train.parse_args(argv)) == 0

    def knn_top1(backbone):
        return knn.evaluate(backbone, str(folder), 32, torch.device("cpu"), (20,))[20][0]

    torch.manual_seed(0)
    random_init = vits.vit_nano(patch_size=8, img_size=32)
    trained = vits.vit_nano(patch_size=8, img_size=32)
    state = ckpt.load_file(tmp_path / "run" / "checkpoint.pth")
    ckpt.load_strict(trained, ckpt.backbone_state_dict(state), "trained")
    before, after = knn_top1(random_init), knn_top1(trained)
    print(f"20-NN top-1: random init {before:.1f} %, trained {after:.1f} %")
    # measured on 2 CPU cores: 72.2 % -> 80.7 % in bf16 (69 s), 81.2 % in fp32; asserted: more than 4 points
    assert after > before + 4, (before, after)
