"""The hinge triplet loss of VSE++ and SCAN on a batch score matrix."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ContrastiveLoss(nn.Module):
    """VSE++/SCAN hinge loss on `scores` [B, B] (image i, caption c) with the matching pairs on the diagonal.

    L = Σ_i [α − s(i,i) + s(i,c')]₊ over negative captions c' (image-to-text)
      + Σ_c [α − s(c,c) + s(i',c)]₊ over negative images i' (text-to-image),
    with only the hardest negative of each row/column when `max_violation` (VSE++, Faghri et al. BMVC 2018),
    else every negative (VSE0). As in fartashf/vsepp and kuanghuei/SCAN `model.py` `ContrastiveLoss`, the cost is
    summed over the batch, not averaged: their learning rate of 2e-4 assumes the sum.

    `warming_up` (set by the training loop during `warmup_epochs`) sums every negative's violation even when
    `max_violation` asks for the hardest one, as VSE∞ trains its first epoch (woodfrog/vse_infty `train.py`:
    `model.set_max_violation(False)` while `epoch < opt.vse_mean_warmup_epochs`).
    """

    def __init__(self, margin: float, max_violation: bool) -> None:
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation
        self.warming_up = False

    def forward(self, scores: Tensor, *_encodings: object) -> dict[str, Tensor]:
        """The terms for an aligned batch's `scores` [B, B] (the batch's encodings, passed by `Matcher`, are not
        needed)."""
        scores = scores.float()  # [B, B]
        positives = scores.diag()  # [B]
        diagonal = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
        # row i: image i against every caption; column c: caption c against every image
        cost_i2t = (self.margin + scores - positives[:, None]).clamp(min=0).masked_fill(diagonal, 0)
        cost_t2i = (self.margin + scores - positives[None, :]).clamp(min=0).masked_fill(diagonal, 0)
        if self.max_violation and not self.warming_up:
            cost_i2t, cost_t2i = cost_i2t.amax(dim=1), cost_t2i.amax(dim=0)
        loss_i2t, loss_t2i = cost_i2t.sum(), cost_t2i.sum()
        return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}
