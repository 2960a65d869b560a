"""Live mechanism diagnostics (paper §5.5) from the per-token tensors every training step already has."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from egrsd_pl.diagnostics.mechanism import (
    DEFAULT_TAU_HIGH,
    DEFAULT_TAU_LOW,
    REGIMES,
    check_regime_thresholds,
    classify_regimes,
    entropy_deciles,
    regime_stats,
    token_gates,
)
from egrsd_pl.losses import masked_mean

DEFAULT_LOOKAHEAD = 5
"""Look-ahead ``W`` of ``Ĥ^CL`` when the run itself has none (``egrsd``, ``rlsd``): the paper's Fig. 4b."""


class MechanismDiagnostics(L.Callback):
    """Logs lock / fork / pivot shares, CL-EGRSD's restore, and entropy histograms and deciles while training.

    Reads ``outputs["token_quantities"]`` of ``training_step`` (mask, teacher entropy, ``δ``, the
    normaliser the gate divided by; detached) in ``on_train_batch_end`` and computes, with
    :mod:`egrsd_pl.diagnostics.mechanism`, per step:

    - ``diag/{lock,fork,pivot,mid}_frac``: share of the step's completion tokens in each regime;
    - ``diag/restore_{lock,fork,pivot,mid}``: mean ``ω^CL − ω`` per regime (the pivot/fork selectivity is
      their ratio; not logged itself, it is undefined on steps without forks);
    - ``diag/omega_mean``, ``diag/omega_cl_mean``, ``diag/gap_abs_mean`` (mean ``|δ|``);
    - every ``histogram_every_n_steps``: TensorBoard histograms of ``H``, ``ω`` and ``ω^CL``;
    - every ``deciles_every_n_steps``: the Fig. 4a decile chart of the step as a TensorBoard image.

    Args:
        enabled: The switch (``--diagnostics.enabled true``); off by default.
        gamma: ``γ`` of both gates; ``None``: the run's ``--model.gamma``.
        window: Look-ahead ``W`` of ``Ĥ^CL``; ``None``: the run's ``--model.window``, or 5 when it is 0.
        tau_low: Lock / resolved threshold on ``Ĥ`` (Decision in :mod:`egrsd_pl.diagnostics.mechanism`).
        tau_high: Uncertain threshold on ``Ĥ``.
        histogram_every_n_steps: Histogram period in optimizer steps (0 disables).
        deciles_every_n_steps: Decile-image period in optimizer steps (0 disables).
    """

    def __init__(
        self,
        enabled: bool = False,
        gamma: float | None = None,
        window: int | None = None,
        tau_low: float = DEFAULT_TAU_LOW,
        tau_high: float = DEFAULT_TAU_HIGH,
        histogram_every_n_steps: int = 10,
        deciles_every_n_steps: int = 50,
    ) -> None:
        check_regime_thresholds(tau_low, tau_high)
        if gamma is not None and gamma < 0:
            raise ValueError(f"--diagnostics.gamma must be >= 0, got {gamma}")
        if window is not None and window < 1:
            raise ValueError(f"--diagnostics.window must be >= 1, got {window}")
        for name, every in (("histogram", histogram_every_n_steps), ("deciles", deciles_every_n_steps)):
            if every < 0:
                raise ValueError(f"--diagnostics.{name}_every_n_steps must be >= 0, got {every}")
        self.enabled = enabled
        self.gamma, self.window = gamma, window
        self.tau_low, self.tau_high = tau_low, tau_high
        self.histogram_every_n_steps = histogram_every_n_steps
        self.deciles_every_n_steps = deciles_every_n_steps
        self._last_picture_step = -1

    @staticmethod
    def should_draw(global_step: int, every: int, last_step: int) -> bool:
        """True once per optimizer step whose number is a multiple of ``every`` (never for ``every = 0``)."""
        return every > 0 and global_step > 0 and global_step % every == 0 and global_step != last_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        objective = getattr(pl_module.hparams, "objective", None)
        if objective not in {"rlsd", "egrsd", "cl_egrsd"}:
            raise ValueError(
                f"--diagnostics.enabled needs an objective with teacher entropy (rlsd, egrsd, cl_egrsd), "
                f"got {objective!r}"
            )

    def settings(self, pl_module: L.LightningModule) -> tuple[float, int, float]:
        """``(γ, W, ω floor)`` of the diagnostics for this run."""
        hparams: Any = pl_module.hparams
        gamma = self.gamma if self.gamma is not None else float(hparams.get("gamma", 0.3))
        window = (
            self.window if self.window is not None else int(hparams.get("window", 0)) or DEFAULT_LOOKAHEAD
        )
        return gamma, window, float(hparams.get("omega_floor", 0.1))

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or not isinstance(outputs, dict) or outputs.get("token_quantities") is None:
            return
        quantities = outputs["token_quantities"]
        entropy, mask = quantities.teacher_entropy, quantities.mask  # [N, T], [N, T]
        if entropy is None:  # same on every rank (the objective decides), so no collective is skipped
            return
        gamma, window, omega_floor = self.settings(pl_module)
        gates = token_gates(
            entropy,
            mask,
            gamma=gamma,
            window=window,
            omega_floor=omega_floor,
            entropy_max=quantities.entropy_max,
        )
        regime = classify_regimes(
            gates.entropy_hat, gates.entropy_cl_hat, mask, tau_low=self.tau_low, tau_high=self.tau_high
        )  # [N, T]
        stats = regime_stats(regime, gates.restore)
        metrics = {f"diag/{name}_frac": stats.shares[i] for i, name in enumerate(REGIMES)}
        metrics.update({f"diag/restore_{name}": stats.mean_restore[i] for i, name in enumerate(REGIMES)})
        # The same keys on every rank, also with an empty mask (0, never NaN): log_dict syncs them.
        metrics["diag/omega_mean"] = masked_mean(gates.omega, mask)
        metrics["diag/omega_cl_mean"] = masked_mean(gates.omega_cl, mask)
        if quantities.delta is not None:
            metrics["diag/gap_abs_mean"] = masked_mean(quantities.delta.abs(), mask)
        batch_size = int(mask.shape[0])
        pl_module.log_dict({k: v.float() for k, v in metrics.items()}, batch_size=batch_size, sync_dist=True)
        self.draw(trainer, entropy, mask, gates, quantities.delta, gamma=gamma)

    def draw(
        self, trainer: L.Trainer, entropy: Any, mask: Any, gates: Any, delta: Any, *, gamma: float
    ) -> None:
        """Histograms and the decile image, on rank 0, once per optimizer step that is due."""
        step = trainer.global_step
        experiment: Any = getattr(trainer.logger, "experiment", None)
        histograms = self.should_draw(step, self.histogram_every_n_steps, self._last_picture_step)
        deciles = self.should_draw(step, self.deciles_every_n_steps, self._last_picture_step)
        if (
            not trainer.is_global_zero
            or not hasattr(experiment, "add_histogram")
            or not (histograms or deciles)
        ):
            return
        self._last_picture_step = step
        if histograms and bool(mask.any()):
            experiment.add_histogram("diag/teacher_entropy", entropy[mask].float().cpu(), step)
            experiment.add_histogram("diag/omega", gates.omega[mask].cpu(), step)
            experiment.add_histogram("diag/omega_cl", gates.omega_cl[mask].cpu(), step)
        if deciles and delta is not None and int(mask.sum()) >= 10:
            from egrsd_pl.diagnostics.report import decile_figure
            from egrsd_pl.evaluation import figure_to_rgb

            stats = entropy_deciles(entropy, delta, gates.omega, mask)
            figure = decile_figure(stats, gamma=gamma)
            experiment.add_image("diag/deciles", figure_to_rgb(figure), step, dataformats="HWC")
