"""The paper's claims about each exercise, checked on small inputs whose answer is known. Each check gets the
module holding the student's lines and raises Failed with the first claim they do not meet, in plain words."""
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Failed(Exception):
    pass


def claim(ok, message):
    if not ok:
        raise Failed(message)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          rtol=tol, atol=tol)


def a_number(x, what):
    """x as a float, once it is one finite number."""
    claim(torch.is_tensor(x) and x.numel() == 1 or isinstance(x, (int, float)),
          f"{what} should be one number, got {type(x).__name__} {tuple(x.shape) if torch.is_tensor(x) else ''}")
    x = float(x.detach() if torch.is_tensor(x) else x)
    claim(math.isfinite(x), f"{what} is {x}: check for a log of 0 or a division by 0")
    return x


# ---------------------------------------------------------------- multi-crop: which crops each network sees
class Recorder(nn.Module):
    """A network that notes the crops it is given: each crop's mean colour, mapped linearly to K logits."""

    def __init__(self, K):
        super().__init__()
        self.linear, self.seen = nn.Linear(3, K), []

    def forward(self, crops):
        crops = [crops] if torch.is_tensor(crops) else list(crops)
        self.seen.append(crops)
        return torch.cat([self.linear(c.mean((2, 3))) for c in crops])


def multicrop(train):
    torch.manual_seed(0)
    K, B = 8, 2
    crops = [torch.randn(B, 3, 8, 8) for _ in range(2)] + [torch.randn(B, 3, 4, 4) for _ in range(3)]
    student = Recorder(K)
    teacher = train.ema.build_teacher(student)
    dino = train.DINO(student, teacher, train.losses.DINOLoss(K, len(crops), 0.04, 0.04, 0, 1),
                      torch.optim.SGD(student.parameters(), lr=0), torch.amp.GradScaler("cpu", enabled=False),
                      train.Schedules(np.zeros(1), np.zeros(1), np.ones(1)), contextlib.nullcontext(), 0, 0)
    try:
        train.train_step(dino, crops, 0, 0)
        error = None
    except Exception as e:  # the loss cannot take outputs of the wrong crops: say which crops, then what broke
        if not teacher.seen and not student.seen:
            raise
        error = e

    def given(net):  # the crops of its first call, by name
        names = ["g1", "g2", "l1", "l2", "l3"]
        return "nothing" if not net.seen else "[" + ", ".join(
            next((n for n, c in zip(names, crops) if c.shape == x.shape and torch.equal(c, x)), f"a {tuple(x.shape)}")
            for x in net.seen[0]) + "]"

    claim(given(teacher) == "[g1, g2]",
          f"the teacher should see only the 2 global crops, crops[:2] = [g1, g2]: its targets come from views of "
          f"the whole image; it was given {given(teacher)}")
    claim(given(student) == "[g1, g2, l1, l2, l3]",
          f"the student should see every crop, [g1, g2, l1, ..., lN]: from the small local crops it learns to give "
          f"a part the teacher's output for the whole; it was given {given(student)}")
    if error is not None:
        raise error


# ---------------------------------------------------------------- centering and sharpening
def reference_loss(student, teacher, center, ncrops, tau_s, tau_t):
    """The loss written term by term: the mean over the 2 (V - 1) pairs of different views of H(P_t, P_s)."""
    s = [F.log_softmax(x / tau_s, dim=-1) for x in student.chunk(ncrops)]
    t = [F.softmax((x - center) / tau_t, dim=-1) for x in teacher.chunk(2)]
    return torch.stack([(-t[i] * s[v]).sum(-1).mean() for i in range(2) for v in range(ncrops) if v != i]).mean()


def centering(losses):
    torch.manual_seed(0)
    K, V, B = 16, 4, 8

    def fresh():  # tau_t warms up from 0.04 to 0.07 over 3 epochs: epoch 1 has its own tau_t
        return losses.DINOLoss(K, V, 0.04, 0.07, 3, 10)

    student, g = torch.randn(V * B, K), torch.randn(2 * B, K)
    h = a_number(fresh()(torch.zeros(V * B, K), g, 1), "the loss")  # a uniform student: H(P_t, P_s) = log K sum_k P_t
    claim(abs(h - math.log(K)) < 1e-4, f"P_t is not a probability distribution: exp(log_pt) should add up to 1 over "
                                       f"the K prototypes (a softmax over the last dimension); it adds up to "
                                       f"{h / math.log(K):.3f}")
    shift = 5 * torch.randn(1, K)
    shifted = fresh()
    shifted.center.copy_(shift)
    loss = a_number(fresh()(student, g, 1), "the loss")
    claim(close(loss, a_number(shifted(student, g + shift, 1), "the loss")),
          "the teacher's output is not centred: P_t should be softmax((g_t - c) / tau_t), so that what every image "
          "shares, once the centre c holds it, changes nothing (with c the batch mean, each column of g_t - c "
          "averages 0 over the batch)")
    tau_t = fresh().teacher_temp(1)
    claim(close(loss, reference_loss(student, g, 0, V, 0.1, tau_t)),
          f"the teacher is not sharpened as it should be: P_t = softmax((g_t - c) / tau_t), with tau_t = "
          f"self.teacher_temp(epoch) ({tau_t:.3f} in epoch 1 here), lower than the student's tau_s = 0.1")
    c0, updated = torch.randn(1, K), fresh()
    updated.center.copy_(c0)
    updated(student, g, 1)
    c = updated.center
    claim(tuple(c.shape) == (1, K), f"the centre should stay one value per prototype, shape (1, K) = (1, {K}); it "
                                    f"became {tuple(c.shape)}")
    claim(torch.isfinite(c).all(), "the centre became NaN or infinite")
    claim(close(c, 0.9 * c0 + 0.1 * g.mean(0, keepdim=True)),
          "the centre does not follow c <- m c + (1 - m) mean_i g_t(x_i) with m = 0.9: after one batch it should "
          "have moved a tenth of the way from c to the batch mean of the teacher's outputs")


# ---------------------------------------------------------------- the loss over view pairs
def pairs(losses):
    torch.manual_seed(0)
    K, V, B = 16, 4, 8
    student, g = torch.randn(V * B, K, requires_grad=True), torch.randn(2 * B, K)
    loss = losses.DINOLoss(K, V, 0.04, 0.04, 0, 1)(student, g, 0)
    value = a_number(loss, "the loss")
    claim(torch.is_tensor(loss) and loss.requires_grad,
          "the loss does not reach the student: keep it a tensor computed from log_ps (no .item(), .detach() or "
          "numpy), so that backward() can train the student")
    log_ps = F.log_softmax(student.detach() / 0.1, dim=-1).chunk(V)
    pt = F.softmax(g / 0.04, dim=-1).chunk(2)
    H = torch.tensor([[(-pt[i] * log_ps[v]).sum(-1).mean().item() for v in range(V)] for i in range(2)])  # (2, V)
    different = torch.stack([H[i, v] for i in range(2) for v in range(V) if v != i])
    if close(value, different.mean()):
        return
    claim(not close(value, H.mean()), "the loss pairs a view with itself: skip the student's view v when it is "
                                      "the teacher's view (the same view is no task), which leaves 2 (V - 1) pairs, "
                                      "not 2 V")
    claim(not close(value, different.sum()), f"the loss adds the {len(different)} pairs up: it should be their mean")
    claim(not close(value, (H[0, 1] + H[1, 0]) / 2),
          "the loss leaves the local crops out: each teacher view should be paired with every other student view, "
          "the local ones included")
    claim(False, f"the loss is not the mean over the 2 (V - 1) = {len(different)} pairs of a teacher view and a "
                 f"different student view of H(P_t, P_s) = -sum_k P_t log P_s (summed over the K prototypes, "
                 f"averaged over the batch): expected {different.mean():.4f}, got {value:.4f}")


# ---------------------------------------------------------------- the momentum teacher and its schedule
def ema(teachers):
    for m in (1.0, 0.0, 0.996):
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        teacher = teachers.build_teacher(student)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        t0, s0 = [p.clone() for p in teacher.parameters()], [p.clone() for p in student.parameters()]
        teachers.ema_update(teacher, student, m)
        t, s = list(teacher.parameters()), list(student.parameters())
        claim(all(torch.equal(a, b) for a, b in zip(s, s0)),
              "the update changed the student: only the teacher follows, the student is trained by its optimizer")
        moved = not all(torch.equal(a, b) for a, b in zip(t, t0))
        if m == 1.0:
            claim(not moved, "with m = 1 the teacher should not move (theta_t <- 1 theta_t + 0 theta_s); it moved")
        elif m == 0.0:
            claim(all(close(a, b) for a, b in zip(t, s)), "with m = 0 the teacher should become the student"
                  + ("" if moved else ", but it did not move: update its tensors in place (mul_, add_), as assigning "
                                      "a new tensor to a name changes nothing in the teacher"))
        else:
            claim(all(close(a, m * a0 + (1 - m) * b) for a, a0, b in zip(t, t0, s)),
                  "theta_t <- m theta_t + (1 - m) theta_s: with m = 0.996 the teacher should move 0.4 % of the way "
                  "towards the student")
    n, momentum = 50, teachers.cosine_scheduler(0.996, 1.0, 10, 5)
    claim(len(momentum) == n, f"the schedule should hold one value per iteration, epochs x niter_per_ep = {n} here; "
                              f"it holds {len(momentum)}")
    expected = 1 - 0.004 * (1 + np.cos(np.pi * np.arange(n) / n)) / 2
    claim(close(momentum[0], 0.996) and close(momentum, expected, tol=1e-7),
          f"the teacher momentum should follow a cosine from m_0 = 0.996 to 1, v_i = final + (base - final) (1 + "
          f"cos(pi i / n)) / 2: 0.996 at the first iteration, 0.998 halfway; it is {momentum[0]:.4f} and "
          f"{momentum[n // 2]:.4f}")
    lr = teachers.cosine_scheduler(1e-3, 1e-6, 10, 5, warmup_epochs=2)
    claim(len(lr) == n and close(lr[10], 1e-3) and np.all(np.diff(lr[10:]) < 0),
          "after a warm-up (here the learning rate's, 2 epochs) the cosine should start at the base value and fall "
          "to the final one: count i from the end of the warm-up")


# ---------------------------------------------------------------- the weighted k-NN vote
def knn(knn_module):
    def predicted(similarities, labels, k, T=0.07):
        """The class predicted for a query whose cosine with training image i is similarities[i]."""
        n = len(similarities)
        train = torch.zeros(n, n + 1)
        train[:, 0] = torch.tensor(similarities)
        train[torch.arange(n), torch.arange(1, n + 1)] = (1 - train[:, 0] ** 2).sqrt()  # unit vectors
        query = F.one_hot(torch.tensor([0]), n + 1).float()
        top1 = knn_module.knn_classifier(train, torch.tensor(labels), query, torch.tensor([0]), k, T, num_classes=2)[0]
        return 0 if a_number(top1, "the top-1 accuracy") == 100 else 1

    claim(predicted([0.2, 0.9], [1, 0], k=1) == 0,
          "the neighbours should be the training images most similar to the query, the largest cosines s_i: with "
          "k = 1, the nearest image is of class 0, yet class 1 was predicted")
    near2_far5 = [0.9, 0.9] + [0.85] * 5, [0, 0] + [1] * 5
    claim(predicted(*near2_far5, k=2) == 0,
          "only the k nearest neighbours should vote: with k = 2 both are of class 0, yet class 1 was predicted")
    claim(predicted(*near2_far5, k=7) == 1,
          "the votes of a class should add up, score_c = sum of exp(s_i / T) over its neighbours: with k = 7 the "
          "five images of class 1 at s = 0.85 outweigh the two of class 0 at s = 0.9, yet class 0 was predicted")
    one_near_two_far = [0.95, 0.6, 0.6], [0, 1, 1]
    claim(predicted(*one_near_two_far, k=3) == 0 and predicted(*one_near_two_far, k=3, T=1.0) == 1,
          "the vote is not weighted as it should be: each of the k neighbours votes exp(s_i / T) for its class, so "
          "that with T = 0.07 one image at s = 0.95 outweighs two at s = 0.6, and with T = 1 the two win")


# ---------------------------------------------------------------- the attention mask at 60 % of the mass
def attention(attention_module):
    masks = attention_module.threshold_masks
    torch.manual_seed(0)
    maps = (2 * torch.randn(3, 20)).softmax(-1).reshape(3, 4, 5)  # 3 heads over 4 x 5 patches, each summing to 1
    mask = masks(maps, 0.6)
    claim(((mask == 0) | (mask == 1)).all(), "a mask should say for each patch: kept (True, 1) or not (False, 0)")
    one = torch.full((1, 4, 5), 0.3 / 19)
    one[0, 2, 3] = 0.7
    kept = masks(one, 0.6).bool().nonzero()[:, 1:].tolist()
    claim(kept, "each mask should hold at least 60 % of its head's attention: a head with 70 % of its attention on "
                "patch (2, 3) should keep that patch; it kept none")
    claim(kept == [[2, 3]], f"the mask should keep the patches with the most attention, where they are: a head with "
                            f"70 % of its attention on patch (2, 3) should keep that patch alone; it kept {kept}")
    for t in (0.6, 0.9):
        mask = masks(maps, t).bool().flatten(1)
        flat = maps.flatten(1)
        mass = (flat * mask).sum(1)
        for h in range(3):
            claim(mass[h] >= t - 1e-6, f"each mask should hold at least {100 * t:.0f} % of its head's attention: "
                                       f"head {h} holds {100 * mass[h]:.1f} %")
            least, most_dropped = flat[h][mask[h]].min(), torch.cat([flat[h][~mask[h]], torch.zeros(1)]).max()
            claim(least >= most_dropped, f"the mask should keep the patches with the most attention: head {h} keeps "
                                         f"one of {100 * least:.1f} % and drops one of {100 * most_dropped:.1f} %")
            claim(mass[h] - least < t, f"each mask should be the smallest set of patches holding {100 * t:.0f} %: "
                                       f"without its least-attended patch, head {h} still holds "
                                       f"{100 * (mass[h] - least):.1f} %")
