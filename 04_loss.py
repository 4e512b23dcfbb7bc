"""The DINO loss: centering, sharpening and cross-entropy between views (paper Sec. 3.1, Eq. 1-2,
Algorithm 1; Sec. 5.3 for the collapse diagnostics).

    P_s(x) = softmax(g_s(x) / tau_s)                         student, tau_s = 0.1
    P_t(x) = softmax((g_t(x) - c) / tau_t)                   teacher, centred then sharpened, no gradient
    loss   = mean over x in {g1, g2}, x' in V, x' != x of  H(P_t(x), P_s(x')),   H(a, b) = -sum_k a_k log b_k
    c     <- m c + (1 - m) mean_i g_t(x_i)                   after the loss, m = 0.9, batch of all processes

Centering keeps one dimension from dominating but pushes towards the uniform distribution;
sharpening (tau_t < tau_s) pushes the other way. Neither alone avoids collapse (Sec. 5.3):
    H(P_t, P_s) = h(P_t) + KL(P_t || P_s)
and in a collapse KL -> 0 while h(P_t) goes to log K (uniform) or 0 (one dimension).

Official defaults: tau_s 0.1, tau_t 0.04 (warmed up linearly from warmup_teacher_temp over
warmup_teacher_temp_epochs, then constant), center momentum 0.9.

Departures: the batch centre is all_reduced only when a process group exists (so one CPU works);
`centering` / `sharpening` switches for the ablation; h(P_t), KL(P_t || P_s) and h of the batch's
mean P_t (one dimension for every image, or a sharp P_t of its own for each) reported on request.

Shapes: B batch, V views (crops), K prototypes.
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9, centering=True, sharpening=True):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        # tau_t per epoch: a linear warm-up, because a too-sharp teacher early on is unstable
        schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp,
        ))
        if not sharpening:  # tau_t = tau_s: the teacher is exactly as soft as the student
            schedule = np.full_like(schedule, student_temp)
        self.teacher_temp_schedule = schedule.tolist()

    def teacher_temp(self, epoch):
        return self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)]

    def forward(self, student_output, teacher_output, epoch, return_diagnostics=False):
        """student_output: (V * B, K) logits of all crops; teacher_output: (2 * B, K) of the global crops."""
        log_ps = F.log_softmax(student_output.float() / self.student_temp, dim=-1).chunk(self.ncrops)  # V x (B, K)
        teacher_output = teacher_output.detach().float()  # stop-gradient
        # exercise centering: log_pt (2B, K), the teacher's log-probabilities over the K prototypes: g_t centred by
        # c = self.center, then sharpened by tau_t = self.teacher_temp(epoch)
        log_pt = F.log_softmax((teacher_output - self.center) / self.teacher_temp(epoch), dim=-1)  # (2B, K)
        # end exercise
        pt = log_pt.exp()
        # exercise pairs: loss, the mean of H(P_t, P_s) = -sum_k P_t log P_s (averaged over the batch) over every pair
        # of a teacher view in pt.chunk(2) and a different student view in log_ps
        total, n_terms = 0.0, 0
        for iq, q in enumerate(pt.chunk(2)):
            for v, log_p in enumerate(log_ps):
                if v == iq:  # the same view is no task
                    continue
                total = total + torch.sum(-q * log_p, dim=-1).mean()
                n_terms += 1
        loss = total / n_terms  # 2 (V - 1) terms
        # end exercise
        if self.centering:
            self.update_center(teacher_output)
        if not return_diagnostics:
            return loss
        # Each teacher view is in V - 1 pairs, so the mean over pairs of h(P_t) is the mean over
        # views, and KL = H(P_t, P_s) - h(P_t) comes for free from the loss.
        entropy = -(pt * log_pt).sum(dim=-1).mean().detach()
        # h of the batch's mean P_t: near 0 only if one dimension takes the mass for every image (the collapse),
        # not when each image's P_t is sharp on a dimension of its own (what sharpening is for)
        mean_pt = pt.mean(dim=0)
        batch_entropy = -(mean_pt * mean_pt.clamp_min(1e-30).log()).sum().detach()
        return loss, {"entropy": entropy, "kl": loss.detach() - entropy, "batch_entropy": batch_entropy}

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = teacher_output.sum(dim=0, keepdim=True)  # (1, K)
        count = torch.tensor(float(len(teacher_output)), device=teacher_output.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            count = count * dist.get_world_size()
        # exercise centering: c <- m c + (1 - m) batch_center / count, in place on c = self.center (1, K),
        # with m = self.center_momentum
        self.center.mul_(self.center_momentum).add_(batch_center / count, alpha=1 - self.center_momentum)
        # end exercise


if __name__ == "__main__":
    torch.manual_seed(0)
    K, B, V = 8, 4, 6
    loss_fn = DINOLoss(K, V, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, nepochs=1)
    logits = 0.1 * torch.randn(B, K)
    logits[:, 0] += 0.2  # a bias every sample shares: dimension 0 is on its way to dominate
    c = logits.mean(0)
    for name, t, cent in (("tau_t = 1", 1.0, 0), ("tau_t = 0.04 (sharpened)", 0.04, 0),
                          ("centred, tau_t = 1", 1.0, c), ("centred, tau_t = 0.04", 0.04, c)):
        p = F.softmax((logits[0] - cent) / t, dim=-1)
        print(f"{name:26s} P_t = {np.round(p.numpy(), 2)}  h = {-(p * p.clamp_min(1e-30).log()).sum():.3f}"
              f" (log K = {np.log(K):.3f})")
    student, teacher = torch.randn(V * B, K), torch.randn(2 * B, K)
    loss, diag = loss_fn(student, teacher, epoch=0, return_diagnostics=True)
    print(f"loss over 2 x (V - 1) = {2 * (V - 1)} pairs: {loss:.4f} = h(P_t) {diag['entropy']:.4f} "
          f"+ KL {diag['kl']:.4f}; centre after one step = 0.1 x batch mean: "
          f"{torch.allclose(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True))}")
