"""The momentum teacher (paper Sec. 3.1 "Teacher network", Sec. 5.2 and Algorithm 1).

    theta_t <- m theta_t + (1 - m) theta_s             after every optimizer step
    m       = 1 - (1 - m_0) (cos(pi i / n) + 1) / 2     cosine from m_0 = 0.996 to 1 over the n iterations

The teacher is never trained: it starts as an exact copy of the student, receives no gradient, and
follows the student as an exponential moving average, a form of Polyak-Ruppert averaging that the
paper finds gives a better model than the student throughout training.

`cosine_scheduler` is the official one (also used for the learning rate and weight decay):
a linear warm-up (np.linspace from start_warmup_value) and then
    v_i = final + (base - final) (1 + cos(pi i / n)) / 2
one value per iteration.

Departure: the update is two fused multi-tensor ops over all parameters (torch._foreach_*) rather
than a Python loop launching two kernels per tensor; the arithmetic is the official one.
"""
import copy

import numpy as np
import torch


def build_teacher(student, teacher=None):
    """An exact copy of the student that gradients never reach. `teacher`: an instance of the same
    architecture to copy into (train.py passes one without stochastic depth, which is student-only)."""
    teacher = copy.deepcopy(student) if teacher is None else teacher
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    # exercise ema: after the warm-up, v_i = final + (base - final) (1 + cos(pi i / n)) / 2 for i in iters, n of them
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    # end exercise
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@torch.no_grad()
def ema_update(teacher, student, m):
    """theta_t <- m theta_t + (1 - m) theta_s over parameters (buffers are not averaged, as in the official code)."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    # exercise ema: theta_t <- m theta_t + (1 - m) theta_s, in place, for each tensor of t_params and of s_params
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, s_params, alpha=1 - m)
    # end exercise


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs, niter = 100, 100
    momentum = cosine_scheduler(0.996, 1.0, epochs, niter)
    lr = cosine_scheduler(5e-4 * 1024 / 256, 1e-6, epochs, niter, warmup_epochs=10)
    print(f"teacher momentum: {momentum[0]:.4f} at the start, {momentum[len(momentum) // 2]:.4f} halfway, "
          f"{momentum[-1]:.6f} at the end")
    print(f"a teacher at m = 0.996 averages the last ~1/(1-m) = {1 / (1 - 0.996):.0f} student steps")
    student = torch.nn.Linear(3, 1)
    teacher = build_teacher(student)
    with torch.no_grad():
        student.weight.add_(1.0)
    ema_update(teacher, student, m=0.996)
    print(f"after the student moves by 1: teacher moved by {(teacher.weight - student.weight + 1).mean():.4f}"
          f" = 1 - m; teacher requires grad: {teacher.weight.requires_grad}")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].plot(momentum), axes[0].set_title("teacher momentum m"), axes[0].set_xlabel("iteration")
    axes[1].plot(lr), axes[1].set_title("learning rate (batch 1024)"), axes[1].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig("schedules.png", dpi=100)
    print("saved schedules.png")
