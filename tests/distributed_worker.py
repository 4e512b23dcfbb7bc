"""Run under torchrun by test_distributed.py: a few DINO steps on 2 processes, checking after each
that the ranks agree and that the centre is the mean over both ranks' batches."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import importlib  # noqa: E402

train = importlib.import_module("train")


def gathered(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def main(argv, result_path, steps):
    torch.set_num_threads(1)
    dino, run = train.setup(train.parse_args(argv))
    assert dist.is_initialized() and dist.get_world_size() == 2
    loss_fn, teacher = dino.loss_fn, dino.teacher
    batches = iter(run.loader)
    for it in range(steps):
        crops, _ = next(batches)
        with torch.no_grad():
            t_out = teacher(crops[:2])  # what the step's teacher will output on this rank
        everyone = torch.cat(gathered(t_out))
        expected_center = 0.9 * loss_fn.center + 0.1 * everyone.mean(0, keepdim=True)
        train.train_step(dino, crops, it, 1)
        assert torch.allclose(loss_fn.center, expected_center, atol=1e-6), "centre is not the mean over all ranks"
        for name, t in (("student", flat(train.unwrap(dino.student))), ("teacher", flat(teacher)),
                        ("center", loss_fn.center)):
            a, b = gathered(t)
            assert torch.equal(a, b), f"ranks disagree on the {name} after step {it}"
    if dist.get_rank() == 0:
        torch.save({"student": train.unwrap(dino.student).state_dict(), "teacher": teacher.state_dict(),
                    "center": loss_fn.center}, result_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[3:], sys.argv[1], int(sys.argv[2]))
