"""``egrsd diagnose`` end to end and the live diagnostics callback, on the tiny testbed."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from egrsd_pl.callbacks.diagnostics import MechanismDiagnostics
from egrsd_pl.cli import build_cli
from egrsd_pl.diagnostics import main as diagnose
from egrsd_pl.diagnostics.command import load_module
from egrsd_pl.losses import GateConfig

ROOT = Path(__file__).resolve().parents[1]
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
    with pytest.raises(ValueError, match="--tau_low / --tau_high"):
        MechanismDiagnostics(tau_low=0.5, tau_high=0.2)


def _checkpoint(root: Path) -> Path:
    return next(p for p in sorted((root / "checkpoints").glob("*.ckpt")) if p.name != "last.ckpt")


def test_checkpoint_adapter_loads_from_the_ckpt_and_from_the_peft_folder(fitted, tiny_model_dir: Path):
    _, root = fitted
    ckpt = _checkpoint(root)
    saved = {k: v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items() if "lora_B" in k}
    assert any(bool(v.abs().sum() > 0) for v in saved.values())  # training moved the zero-initialised B
    config = ROOT / "configs" / "tiny.yaml"
    from_ckpt = load_module(config, ckpt, str(tiny_model_dir))
    from_folder = load_module(config, ckpt.with_name(ckpt.stem + "_adapter"), str(tiny_model_dir))
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
            str(ROOT / "configs" / "tiny.yaml"),
            "--model",
            str(tiny_model_dir),
            "--ckpt_path",
            str(_checkpoint(root)),
            "--benchmarks",
            "synthetic",
            "--problems",
            "3",
            "--samples",
            "2",
            "--max_new_tokens",
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
    summary = json.loads((out / "diagnostics.json").read_text())
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
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    first = rows[0]
    assert len(first["tokens"]) == len(first["entropy"]) == len(first["omega_cl"]) == len(first["regime"])
    # ω^CL ≥ ω at every token (the window minimum never raises the entropy).
    assert all(b >= a - 1e-6 for row in rows for a, b in zip(row["omega"], row["omega_cl"], strict=True))


def test_diagnose_rejects_bad_thresholds_before_loading_anything(tmp_path: Path):
    with pytest.raises(ValueError, match="--tau_low / --tau_high need 0 <= tau_low < tau_high"):
        diagnose(["--output", str(tmp_path), "--tau_low", "0.5", "--tau_high", "0.3"])
    with pytest.raises(FileNotFoundError, match="--ckpt_path"):
        diagnose(["--output", str(tmp_path), "--ckpt_path", str(tmp_path / "missing.ckpt")])


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
