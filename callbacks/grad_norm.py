"""Logs the total gradient norm before clipping (``grad/norm_preclip``) and whether clipping acted."""

from __future__ import annotations

import lightning as L
import torch
from torch.optim import Optimizer

from egrsd_pl.sharding import full_tensor


class GradNormMonitor(L.Callback):
    """Logs ``grad/norm_preclip`` every optimizer step, and ``grad/clipped`` (1 when it exceeds the clip value).

    Lightning calls ``on_before_optimizer_step`` after the gradients are unscaled (mixed precision)
    and all-reduced (DDP) or reduce-scattered (FSDP2), and before ``gradient_clip_val`` is applied, so the
    norm is the one the clipping sees. It is computed as ``clip_grad_norm_`` computes it
    (``torch.nn.utils.get_total_norm``); under FSDP2 each rank holds a shard of every gradient, and the
    norm is reduced over the shards (every rank calls it), so it equals the DDP value.

    Args:
        norm_type: The p of the p-norm (2 = Euclidean, as clipping uses).
    """

    def __init__(self, norm_type: float = 2.0) -> None:
        self.norm_type = norm_type

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = full_tensor(torch.nn.utils.get_total_norm([g.detach().float() for g in grads], self.norm_type))
        pl_module.log("grad/norm_preclip", norm, batch_size=1)
        clip = trainer.gradient_clip_val
        if clip and self.norm_type == 2.0 and trainer.gradient_clip_algorithm in (None, "norm"):
            # clip_grad_norm_ scales the gradients by clip / (norm + 1e-6) whenever that factor is below 1.
            pl_module.log("grad/clipped", (norm + 1e-6 > clip).float(), batch_size=1)
