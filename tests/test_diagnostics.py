"""``egrsd diagnose`` end to end and the live diagnostics callback, on the tiny testbed."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

from egrsd_pl.callbacks.diagnostics import MechanismDiagnostics
from egrsd_pl.cli import build_cli, parse_run
from egrsd_pl.diagnostics import main as run_diagnose
from egrsd_pl.diagnostics.command import load_module, prepare_module, score_batch
from egrsd_pl.diagnostics.options import add_arguments, resolve_settings
from egrsd_pl.losses import GateConfig
from egrsd_pl.problem_sources import load_problems
from egrsd_pl.stats import RunningRewardStats

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def diagnose(args: list[str]) -> int:
    """``egrsd diagnose ARGS`` in this process (the CLI hands the diagnostics its parser)."""
    return run_diagnose(args, parse_run=parse_run)


def _reject(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def strict_load(text: str) -> Any:
    """What ``JSON.parse`` accepts: Python's parser with ``NaN`` / ``Infinity`` refused."""
    return json.loads(text, parse_constant=_reject)


DIAG_SCALARS = {f"diag/{name}_frac" for name in ("lock", "fork", "pivot", "mid")} | {
    f"diag/restore_{name}" for name in ("lock", "fork", "pivot", "mid")
}


@pytest.fixture(scope="module")
def fitted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2-step EGRSD fit of the tiny model through the real CLI with the live diagnostics on."""
    root = tmp_path_factory.mktemp("fit")
    cli = build_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--model.model_name_or_path",
            str(tiny_model_dir),
            "--data.train_source",
            "synthetic:16",
            "--data.batch_size",
            "4",
            "--data.max_new_tokens",
            "24",
            "--trainer.max_steps",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(root),
            "--evaluation.at_end",
            "false",
            "--evaluation.every_n_steps",
            "0",
            "--checkpoint.dirpath",
            str(root / "checkpoints"),
            "--diagnostics.enabled",
            "true",
            "--diagnostics.histogram_every_n_steps",
            "1",
            "--diagnostics.deciles_every_n_steps",
            "2",
        ]
    )
    return cli, root


def test_live_callback_logs_regime_shares_restore_histograms_and_deciles(fitted):
    cli, root = fitted
    metrics = cli.trainer.callback_metrics
    assert set(metrics) >= DIAG_SCALARS, sorted(metrics)
    shares = sum(float(metrics[f"diag/{name}_frac"]) for name in ("lock", "fork", "pivot", "mid"))
    assert shares == pytest.approx(1.0, abs=1e-5)
    assert float(metrics["diag/restore_lock"]) >= 0.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(root.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent), size_guidance={"histograms": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "diag/pivot_frac" in tags["scalars"]
    assert [e.step for e in accumulator.Histograms("diag/teacher_entropy")] == [1, 2]
    assert [e.step for e in accumulator.Images("diag/deciles")] == [2]


def test_callback_is_off_by_default_and_refuses_objectives_without_entropy():
    assert MechanismDiagnostics().enabled is False
    assert MechanismDiagnostics.should_draw(10, 10, last_step=-1)
    assert not MechanismDiagnostics.should_draw(10, 10, last_step=10)  # once per optimizer step
    assert not MechanismDiagnostics.should_draw(7, 10, last_step=-1)
    assert not MechanismDiagnostics.should_draw(10, 0, last_step=-1)

    class _Module:
        hparams = {"objective": "grpo"}

    with pytest.raises(ValueError, match="--diagnostics.enabled needs an objective with teacher entropy"):
        MechanismDiagnostics(enabled=True).setup(None, _Module(), "fit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--diagnostics.tau_low / --diagnostics.tau_high"):
        MechanismDiagnostics(tau_low=0.5, tau_high=0.2)


def _checkpoint(root: Path) -> Path:
    return next(p for p in sorted((root / "checkpoints").glob("*.ckpt")) if p.name != "last.ckpt")


def test_checkpoint_adapter_loads_from_the_ckpt_and_from_the_peft_folder(fitted, tiny_model_dir: Path):
    _, root = fitted
    ckpt = _checkpoint(root)
    saved = {k: v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items() if "lora_B" in k}
    assert any(bool(v.abs().sum() > 0) for v in saved.values())  # training moved the zero-initialised B
    base = ["--config", TINY, "--model.model_name_or_path", str(tiny_model_dir)]
    from_ckpt = load_module([*base, "--ckpt_path", str(ckpt)], parse_run)
    from_folder = load_module([*base, "--ckpt_path", str(ckpt.with_name(ckpt.stem + "_adapter"))], parse_run)
    for key, value in saved.items():
        torch.testing.assert_close(from_ckpt.state_dict()[key], value, rtol=0, atol=0)
        torch.testing.assert_close(from_folder.state_dict()[key], value, rtol=0, atol=0)


class _Spans(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.per_completion: list[int] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "div" and "completion" in classes:
            self.per_completion.append(0)
        elif tag == "span" and "tok" in classes:
            self.per_completion[-1] += 1


def test_diagnose_on_a_checkpoint_writes_every_output(fitted, tiny_model_dir: Path, tmp_path: Path):
    _, root = fitted
    out = tmp_path / "diag"
    code = diagnose(
        [
            "--config",
            TINY,
            "--model.model_name_or_path",
            str(tiny_model_dir),
            "--ckpt_path",
            str(_checkpoint(root)),
            "--evaluation.temperature",
            "1.0",
            "--problems",
            "3",
            "--samples",
            "2",
            "--evaluation.max_new_tokens",
            "24",
            "--traces",
            "2",
            "--trace_tokens",
            "16",
            "--html_completions",
            "4",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    for name in (
        "diagnostics.json",
        "tokens.jsonl",
        "deciles.md",
        "deciles.png",
        "regimes.md",
        "regimes.png",
    ):
        assert (out / name).stat().st_size > 0, name
    summary = strict_load((out / "diagnostics.json").read_text())  # every JSON it writes is strict JSON
    assert summary["completions"] == 6
    assert summary["tokens"] == sum(c["length"] for c in summary["per_completion"])
    assert sum(summary["deciles"]["counts"]) == summary["tokens"]
    assert sum(summary["regimes"]["counts"]) == summary["tokens"]
    assert sorted(p.name for p in (out / "traces").iterdir()) == ["trace_01.png", "trace_02.png"]
    parser = _Spans()
    parser.feed((out / "tokens.html").read_text(encoding="utf-8"))
    shown = summary["html_completions"]
    assert len(shown) == 4
    assert parser.per_completion == [summary["per_completion"][i]["length"] for i in shown]
    rows = [strict_load(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    first = rows[0]
    assert len(first["tokens"]) == len(first["entropy"]) == len(first["omega_cl"]) == len(first["regime"])
    # ω^CL ≥ ω at every token (the window minimum never raises the entropy).
    assert all(b >= a - 1e-6 for row in rows for a, b in zip(row["omega"], row["omega_cl"], strict=True))


def test_diagnose_rejects_bad_thresholds_before_loading_anything(tmp_path: Path):
    thresholds = ["--diagnostics.tau_low", "0.5", "--diagnostics.tau_high", "0.3"]
    with pytest.raises(
        ValueError, match="--diagnostics.tau_low / --diagnostics.tau_high need 0 <= tau_low < tau_high"
    ):
        diagnose(["--config", TINY, "--output", str(tmp_path), *thresholds])
    with pytest.raises(FileNotFoundError, match="--ckpt_path"):
        diagnose(["--config", TINY, "--output", str(tmp_path), "--ckpt_path", str(tmp_path / "missing.ckpt")])
    with pytest.raises(ValueError, match="--samples must be >= 1 or null, got 0"):
        diagnose(["--config", TINY, "--output", str(tmp_path), "--samples", "0"])
    assert not any(tmp_path.iterdir())  # nothing written


class _RecordingModule:
    hparams = {"objective": "egrsd"}
    gate = GateConfig()  # what EGRSDModule builds from --model.gamma / window / omega_floor

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_dict(self, metrics, **kwargs) -> None:
        self.logged = {k: float(v) for k, v in metrics.items()}


class _Trainer:
    global_step = 1
    logger = None
    is_global_zero = True


def _step_outputs(entropy: torch.Tensor, mask: torch.Tensor) -> dict:
    from egrsd_pl.losses import TokenQuantities

    return {
        "loss": torch.tensor(0.0),
        "token_quantities": TokenQuantities(mask, entropy, entropy * 0, torch.tensor(10.0)),
    }


def test_callback_scalars_on_a_hand_built_step_and_on_an_empty_mask():
    # The hand-built row of test_diagnostics_mechanism.py (normaliser 10 nats, W 2):
    # regimes L P L L F F M M M, restore 0 .225 0 0 0 .06 .15 .06 0.
    entropy = torch.tensor([[0.5, 8.0, 0.5, 0.5, 5.0, 6.0, 7.0, 4.0, 2.0]])
    mask = torch.ones_like(entropy, dtype=torch.bool)
    module = _RecordingModule()
    callback = MechanismDiagnostics(enabled=True, window=2)
    callback.on_train_batch_end(_Trainer(), module, _step_outputs(entropy, mask), None, 0)  # type: ignore[arg-type]
    logged = module.logged
    assert logged["diag/pivot_frac"] == pytest.approx(1 / 9)
    assert logged["diag/lock_frac"] == pytest.approx(3 / 9)
    assert logged["diag/fork_frac"] == pytest.approx(2 / 9)
    assert logged["diag/restore_pivot"] == pytest.approx(0.225, abs=1e-6)
    assert logged["diag/restore_fork"] == pytest.approx(0.03, abs=1e-6)  # (0 + 0.06) / 2
    # An empty step logs the same keys (DDP ranks must agree), as zeros.
    empty = _RecordingModule()
    callback.on_train_batch_end(_Trainer(), empty, _step_outputs(entropy, ~mask), None, 0)  # type: ignore[arg-type]
    assert set(empty.logged) == set(logged)
    assert all(value == 0.0 for value in empty.logged.values())


def _tokens(out: Path) -> list[dict[str, Any]]:
    return [strict_load(line) for line in (out / "tokens.jsonl").read_text().splitlines()]


def test_diagnose_reads_the_config_like_fit_and_stacked_overrides_change_the_gate(tmp_path: Path):
    # The README's command, as a user types it (plus a problem count, to stay fast): the testbed model, the
    # synthetic benchmark, K 1, greedy, 192 new tokens, γ 0.3 and the gate floor of configs/tiny.yaml.
    out = tmp_path / "d"
    command = [
        sys.executable,
        "main.py",
        "diagnose",
        "--config",
        TINY,
        "--output",
        str(out),
        "--problems",
        "2",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    settings = strict_load((out / "diagnostics.json").read_text())["settings"]
    assert [b["name"] for b in settings["benchmarks"]] == ["synthetic"] and settings["problems"] == 2
    assert settings["sampling"] == {
        "temperature": 0.0,
        "top_p": 0.95,
        "top_k": -1,
        "max_new_tokens": 192,
        "num_rollouts": 1,
        "seed": 0,
    }
    # γ 0.3 and floor 0.1 from model:, W 5 (tiny.yaml is EGRSD, W 0), a training step's 32 completions.
    assert (settings["gamma"], settings["window"], settings["omega_floor"]) == (0.3, 5, 0.1)
    assert (settings["batch_size"], settings["device"]) == (32, "cpu")

    # A second --config on top (as `fit` stacks them) and a dotted override.
    stacked = tmp_path / "gamma.yaml"
    stacked.write_text("model:\n  gamma: 0.5\n")
    other = tmp_path / "d2"
    assert (
        diagnose(
            [
                "--config",
                TINY,
                "--config",
                str(stacked),
                "--diagnostics.window",
                "2",
                "--output",
                str(other),
                "--problems",
                "2",
            ]
        )
        == 0
    )
    again = strict_load((other / "diagnostics.json").read_text())["settings"]
    assert (again["gamma"], again["window"], again["omega_floor"]) == (0.5, 2, 0.1)
    first, second = _tokens(out), _tokens(other)
    assert [r["tokens"] for r in first] == [r["tokens"] for r in second]  # greedy: the same completions
    changed = 0
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(torch.tensor(a["entropy"]), torch.tensor(b["entropy"]), rtol=0, atol=1e-6)
        hat = torch.tensor(b["entropy_hat"])
        # ω = clip(1 − γĤ, 0.1, 1) at γ 0.5; the first run's at γ 0.3.
        torch.testing.assert_close(
            torch.tensor(b["omega"]), (1 - 0.5 * hat).clamp(0.1, 1.0), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            torch.tensor(a["omega"]), (1 - 0.3 * hat).clamp(0.1, 1.0), rtol=0, atol=1e-6
        )
        changed += int((torch.tensor(a["omega"]) - torch.tensor(b["omega"])).abs().gt(1e-3).sum())
    assert changed > 0


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
def test_diagnose_scores_a_batch_exactly_as_the_training_step_does(tiny_model_dir: Path, tmp_path: Path):
    config, init = parse_run(
        [
            "--config",
            TINY,
            "--model.model_name_or_path",
            str(tiny_model_dir),
            "--data.train_source",
            "synthetic:3",
            "--data.batch_size",
            "3",
            "--data.max_new_tokens",
            "16",
            "--output",
            str(tmp_path),
        ],
        add_arguments,
    )
    settings = resolve_settings(config, init)
    module, datamodule = prepare_module(init, settings)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0 (student = teacher, δ = 0): make the adapter matter
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    module.reward_statistics = RunningRewardStats()  # what callbacks.RewardStatistics hands over
    batch = datamodule.make_batch(load_problems("synthetic:3"), module, step=0, seed=0)
    datamodule.teardown("fit")
    trained = module.training_step(batch, 0)["token_quantities"]
    owners = [batch.problems[r.prompt_index] for r in batch.rollouts]
    diagnosed = score_batch(module, datamodule, owners, batch.rollouts, settings.gate)
    mask = trained.mask
    assert torch.equal(diagnosed.mask, mask) and int(mask.sum()) > 10
    assert settings.gate.gamma == module.gate.gamma == 0.3
    for field in ("teacher_entropy", "delta", "omega"):
        expected, actual = getattr(trained, field), getattr(diagnosed, field)
        assert torch.equal(actual[mask], expected[mask]), field
    assert torch.equal(diagnosed.entropy_max, trained.entropy_max)
    assert float(trained.delta[mask].abs().max()) > 1e-3  # the two models differ: δ is not trivially 0
    assert float(trained.omega[mask].min()) < 1.0  # and the gate acts
