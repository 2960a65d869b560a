"""The confidence gate's settings have one home: one default, one bound, one window rule for every consumer."""

from __future__ import annotations

import inspect

import pytest
import torch

from egrsd_pl.callbacks.diagnostics import MechanismDiagnostics
from egrsd_pl.cli import EGRSDCLI, build_cli
from egrsd_pl.diagnostics.mechanism import DEFAULT_LOOKAHEAD, diagnostic_gate, token_gates
from egrsd_pl.losses import (
    DEFAULT_GATE,
    GateConfig,
    ObjectiveInputs,
    ObjectiveSettings,
    compute_objective,
    confidence_gate,
    egrsd_loss,
)
from egrsd_pl.module import EGRSDModule


class _ParseOnly(EGRSDCLI):
    def instantiate_classes(self) -> None:
        pass


def test_the_paper_defaults_once():
    # Paper §4: γ 0.3, floor 0.1; W 0 is EGRSD (cl_egrsd sets its own W in its config).
    assert (DEFAULT_GATE.gamma, DEFAULT_GATE.window, DEFAULT_GATE.omega_floor) == (0.3, 0, 0.1)
    assert GateConfig() == DEFAULT_GATE


def _default(function, name):
    return inspect.signature(function).parameters[name].default


@pytest.mark.parametrize("field", ["gamma", "window", "omega_floor"])
def test_every_consumer_gets_the_same_default(field):
    expected = getattr(DEFAULT_GATE, field)
    consumers = [EGRSDModule.__init__, compute_objective]
    if field != "gamma":  # egrsd_loss and confidence_gate require γ
        consumers += [egrsd_loss, confidence_gate]
    for function in consumers:
        assert _default(function, field) == expected, function.__qualname__
    assert getattr(ObjectiveSettings(), field) == expected
    if field == "omega_floor":
        assert _default(token_gates, field) == expected
    # The CLI's default (no config): what `fit`, `validate` and `diagnose` parse.
    parsed = build_cli([], run=False, cli_class=_ParseOnly).config
    assert parsed.model[field] == expected
    assert getattr(EGRSDModule().gate, field) == expected


def test_the_diagnostics_take_the_runs_gate_and_a_five_token_look_ahead_for_egrsd():
    module = EGRSDModule()  # egrsd, γ 0.3, W 0
    assert MechanismDiagnostics().settings(module) == GateConfig(0.3, DEFAULT_LOOKAHEAD, 0.1)
    assert DEFAULT_LOOKAHEAD == 5  # paper Fig. 4b
    cl = EGRSDModule(objective="cl_egrsd", gamma=1.0, window=3, omega_floor=0.2)
    assert MechanismDiagnostics().settings(cl) == GateConfig(1.0, 3, 0.2)
    assert MechanismDiagnostics(gamma=0.5, window=2).settings(cl) == GateConfig(0.5, 2, 0.2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: EGRSDModule(omega_floor=1.5), r"^--model\.omega_floor must be in \[0, 1\], got 1\.5$"),
        (lambda: EGRSDModule(gamma=-0.1), r"^--model\.gamma must be a finite number >= 0, got -0\.1$"),
        (lambda: GateConfig(window=-1), r"^--model\.window must be an integer >= 0, got -1$"),
        (lambda: MechanismDiagnostics(gamma=-1.0), r"^--diagnostics\.gamma must be a finite number >= 0"),
        (lambda: MechanismDiagnostics(window=0), r"^--diagnostics\.window must be an integer >= 1"),
        (lambda: diagnostic_gate(DEFAULT_GATE, gamma=float("nan")), r"^--diagnostics\.gamma must be"),
        (
            lambda: confidence_gate(
                torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), gamma=0.3, omega_floor=2.0
            ),
            r"^omega_floor must be in \[0, 1\], got 2\.0$",
        ),
        (
            lambda: compute_objective("egrsd", _inputs(), omega_floor=-0.1),
            r"^omega_floor must be in \[0, 1\], got -0\.1$",
        ),
    ],
)
def test_the_bound_is_checked_in_one_place_and_names_the_flag(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _inputs() -> ObjectiveInputs:
    mask = torch.ones(1, 2, dtype=torch.bool)
    logp = torch.full((1, 2), -1.0)
    return ObjectiveInputs(logp, mask, torch.ones(1), teacher_logp=logp, teacher_entropy=torch.ones(1, 2))


def test_a_floor_of_zero_is_accepted_everywhere():
    # ω = clip(1 - γĤ, 0, 1): at γ 2 and Ĥ = 1 (H = H_max = 1 nat) the gate is 0, not negative.
    assert EGRSDModule(omega_floor=0.0, gamma=2.0).gate.omega_floor == 0.0
    omega = confidence_gate(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), gamma=2.0, omega_floor=0.0)
    assert omega.tolist() == [[0.0, 0.0]]
    compute_objective("egrsd", _inputs(), gamma=2.0, omega_floor=0.0)


@pytest.mark.parametrize(
    ("objective", "window", "message"),
    [
        ("cl_egrsd", 0, "--model.objective cl_egrsd needs --model.window > 0 (paper: 3 on 4B, 5 on 8B)"),
        (
            "egrsd",
            3,
            "--model.window is the look-ahead of cl_egrsd; it must be 0 for --model.objective egrsd, got 3",
        ),
    ],
)
def test_the_window_rule_is_one_rule(objective, window, message):
    for make in (
        lambda: EGRSDModule(objective=objective, window=window),
        lambda: compute_objective(objective, _inputs(), window=window),
    ):
        with pytest.raises(ValueError) as error:
            make()
        assert str(error.value) == message
