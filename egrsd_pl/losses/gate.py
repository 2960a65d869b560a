"""The confidence gate's settings, once: defaults, bounds and the window rule (docs/algorithm.md, steps 6–8).

:class:`GateConfig` is the one typed home of ``γ``, ``W`` and the ``ω`` floor. The module builds it from
its ``--model.*`` arguments, the live diagnostics and ``egrsd diagnose`` derive theirs from the run's
(:func:`egrsd_pl.diagnostics.mechanism.diagnostic_gate`), and the pure loss functions take its fields as
plain scalars with :data:`DEFAULT_GATE`'s values as defaults. The bounds themselves are checked by
:mod:`egrsd_pl.losses._checks`, the same checks the loss functions run on their arguments; the window
rule of the objectives is :func:`check_objective_window`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from egrsd_pl.losses._checks import check_gamma, check_omega_floor, check_window

GATED_WINDOW_OBJECTIVE = "cl_egrsd"
"""The one objective with a look-ahead window ``W > 0``; every other one needs ``W = 0``."""


@dataclass(frozen=True)
class GateConfig:
    """``ω = clip(1 − γ·Ĥ, omega_floor, 1)``, with ``Ĥ`` from the causal window minimum over ``W`` tokens.

    Validated on construction; each error names the command-line flag (``flag_prefix`` + field).

    Attributes:
        gamma: Gate strength ``γ >= 0`` (paper: 0.3; 1.0 for CL-EGRSD on 8B); 0 is RLSD's ``ω = 1``.
        window: Look-ahead ``W >= 0`` of CL-EGRSD's window minimum (paper: 3 on 4B, 5 on 8B); 0 is EGRSD.
        omega_floor: Lower clip of ``ω``, in ``[0, 1]`` (paper: 0.1).
        flag_prefix: Where the fields live on the command line, for error messages (``--model.``,
            ``--diagnostics.``); not part of the value.
    """

    gamma: float = 0.3
    window: int = 0
    omega_floor: float = 0.1
    flag_prefix: str = field(default="--model.", compare=False, repr=False)

    def __post_init__(self) -> None:
        check_gamma(self.gamma, name=f"{self.flag_prefix}gamma")
        check_window(self.window, name=f"{self.flag_prefix}window")
        check_omega_floor(self.omega_floor, name=f"{self.flag_prefix}omega_floor")


DEFAULT_GATE = GateConfig()
"""The defaults every consumer shares (γ 0.3, W 0, floor 0.1)."""


def check_objective_window(objective: str, window: int) -> None:
    """``cl_egrsd`` needs ``W > 0``, every other objective ``W = 0``; else one line naming both flags."""
    if objective == GATED_WINDOW_OBJECTIVE and window <= 0:
        raise ValueError(f"--model.objective {objective} needs --model.window > 0 (paper: 3 on 4B, 5 on 8B)")
    if objective != GATED_WINDOW_OBJECTIVE and window != 0:
        raise ValueError(
            f"--model.window is the look-ahead of cl_egrsd; it must be 0 for --model.objective {objective}, "
            f"got {window}"
        )
