"""Live mechanism diagnostics (paper §5.5) from the per-token tensors every training step already has."""

from __future__ import annotations

from typing import Any, cast

import lightning as L
import torch

from egrsd_pl.diagnostics.mechanism import (
    DEFAULT_TAU_HIGH,
    DEFAULT_TAU_LOW,
    REGIMES,
    check_regime_thresholds,
    classify_regimes,
    diagnostic_gate,
    entropy_deciles,
    regime_stats,
    token_gates,
)
from egrsd_pl.losses import DEFAULT_GATE, GateConfig, masked_mean


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
        window: Look-ahead ``W >= 1`` of ``Ĥ^CL``; ``None``: the run's ``--model.window``, or 5 when it is 0
            (:func:`~egrsd_pl.diagnostics.mechanism.diagnostic_gate`; ``egrsd diagnose`` reads the same).
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
        diagnostic_gate(DEFAULT_GATE, gamma=gamma, window=window)  # checks --diagnostics.gamma / window
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

    def settings(self, pl_module: L.LightningModule) -> GateConfig:
        """``γ``, ``W`` and the ``ω`` floor of the diagnostics for this run (from ``pl_module.gate``)."""
        run: GateConfig = cast(Any, pl_module).gate
        return diagnostic_gate(run, gamma=self.gamma, window=self.window)

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
        gate = self.settings(pl_module)
        gates = token_gates(
            entropy,
            mask,
            gamma=gate.gamma,
            window=gate.window,
            omega_floor=gate.omega_floor,
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
        self.draw(trainer, entropy, mask, gates, quantities.delta, gamma=gate.gamma)

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
