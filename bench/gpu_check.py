"""The Python side of ``bench/gpu_check.sh``: the first-GPU acceptance run of the real training path.

    python bench/gpu_check.py fit --out OUT [--devices 1] [--steps 3] [--model testbed:qwen3-shape?like=qwen3-4b]
    python bench/gpu_check.py startup --out OUT          # the engine at the evaluation's 32,768-token cap
    python bench/gpu_check.py table --out OUT [--write OUT/gpu_check.md]
    python bench/gpu_check.py fit --out OUT --config configs/qwen3_14b/egrsd.yaml --tag fsdp2  # the FSDP2 path
    python bench/gpu_check.py fit --out OUT --config configs/tiny_vllm.yaml --model testbed:tiny --set=...  # CPU smoke

``fit`` runs ``configs/egrsd.yaml`` through the real CLI (bf16-mixed, gradient checkpointing, LoRA r 64,
vLLM with merged sync and sleep mode, DDP when ``--devices`` > 1; ``--config configs/qwen3_14b/egrsd.yaml``: FSDP2,
the config's strategy) on a random-weight model with a real
model's exact shape, for ``--steps`` optimizer steps on synthetic problems (the hub dataset is not
needed). flash-attention 2 is used when ``flash_attn`` imports, else sdpa (the record says which).
:class:`GpuRecorder` writes, per rank, ``fit_[<tag>_]<devices>gpu_rank<r>.json``:

- per step: ``time/step_s``, ``time/rollout_s``, the trainer's peak allocated memory during the training
  step (reset at each batch start, i.e. after the engine started and generated), and the device-wide
  peak in use over the whole step including generation (``torch.cuda.mem_get_info``, sampled every
  0.2 s by a thread);
- that the current CUDA device equals the rank's local rank at every step;
- after step 2: vLLM's greedy tokens against the HF student's (same synced policy, bf16) on 4 prompts:
  equal prompts and the first differing position. Random weights give near-uniform logits, so bf16
  rounding can flip an argmax: the record reports, it does not fail.

``startup`` builds the module and the config's engine the way ``validate`` does, reserves the longest
evaluation prompt + 32,768 tokens, starts vLLM and reports its ``max_model_len``, KV cache size (tokens)
and memory, then generates 16 tokens. ``table`` prints every record of ``--out`` as markdown.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

DEFAULT_MODEL = "testbed:qwen3-shape?like=qwen3-4b"
EVALUATION_CAP = 32_768


def attention_implementation() -> str:
    """``flash_attention_2`` when ``flash_attn`` is importable, else ``sdpa``."""
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def fit_arguments(
    out: Path,
    *,
    devices: int,
    steps: int,
    model: str,
    attention: str,
    config: str = "configs/egrsd.yaml",
    extra: tuple[str, ...] = (),
    tag: str = "",
) -> list[str]:
    """The ``fit`` command line of the check: the paper config, shortened to ``steps`` and a synthetic source
    (``config`` and ``extra`` overrides: the CPU smoke test runs the same path on the tiny testbed)."""
    recorder = {
        "class_path": "gpu_check.GpuRecorder",
        "init_args": {"out_dir": str(out), "devices": devices, "tag": tag},
    }
    return [
        "fit",
        "--config",
        str(ROOT / config),
        f"--model.model_name_or_path={model}",
        f"--model.attn_implementation={attention}",
        f"--trainer.devices={devices}",
        f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        "--data.train_source=synthetic:64",
        "--evaluation.every_n_steps=0",
        "--evaluation.at_end=false",
        "--checkpoint.every_n_train_steps=0",
        "--checkpoint.save_last=false",
        f"--trainer.callbacks+={json.dumps(recorder)}",
        *extra,
    ]


class DevicePeak:
    """The device-wide peak of memory in use (all processes), sampled by a thread every ``interval`` s."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(self.interval)


class GpuRecorder(L.Callback):
    """Records the per-step figures of the GPU check into ``out_dir/fit_[<tag>_]<devices>gpu_rank<r>.json``.

    Args:
        out_dir: Folder of the records.
        devices: Processes of the run (names the file).
        compare_after_step: Optimizer step after which vLLM's greedy tokens are compared with HF's.
        tag: Names the run in the file and the table (e.g. ``fsdp2``); empty: none.
    """

    def __init__(self, out_dir: str, devices: int = 1, compare_after_step: int = 2, tag: str = "") -> None:
        self.out_dir = Path(out_dir)
        self.devices = devices
        self.tag = tag
        self.compare_after_step = compare_after_step
        self.record: dict[str, Any] = {"steps": [], "devices_ok": True}
        self._device_peak = DevicePeak()
        self._step_started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        # The batch exists: the engine has started and generated this step's rollouts.
        if torch.cuda.is_available():
            device = torch.cuda.current_device()
            self.record["devices_ok"] &= device == trainer.local_rank
            self.record.setdefault("device", device)
            torch.cuda.reset_peak_memory_stats()
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/")}
        self.record["steps"].append(
            {
                "step": trainer.global_step,
                "time/step_s": metrics.get("time/step_s"),
                "time/rollout_s": metrics.get("time/rollout_s", getattr(batch, "rollout_seconds", None)),
                "train_s": time.perf_counter() - self._step_started,
                "peak_allocated_gib": _gib(torch.cuda.max_memory_allocated)
                if torch.cuda.is_available()
                else None,
                "device_peak_gib": self._device_peak.stop() / 2**30 if torch.cuda.is_available() else None,
            }
        )
        if trainer.global_step == self.compare_after_step:
            self.record["greedy"] = compare_greedy(trainer, pl_module)
        if torch.cuda.is_available():
            self._device_peak.start()
        self.save(trainer)

    def on_fit_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.record.update(
            attention=pl_module.hparams.attn_implementation,
            model=pl_module.hparams.model_name_or_path,
            world_size=trainer.world_size,
            rank=trainer.global_rank,
            local_rank=trainer.local_rank,
            gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU smoke run)",
        )
        if torch.cuda.is_available():
            self.record["gpu_gib"] = torch.cuda.mem_get_info()[1] / 2**30
            self._device_peak.start()

    def on_fit_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        if torch.cuda.is_available():
            self._device_peak.stop()
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{self.tag}_" if self.tag else ""
        path = self.out_dir / f"fit_{tag}{self.devices}gpu_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record, indent=2) + "\n")


def compare_greedy(trainer: L.Trainer, pl_module: Any, prompts: int = 4, tokens: int = 64) -> dict[str, Any]:
    """vLLM's greedy completions against the HF student's, both on the current policy."""
    from egrsd_pl.rollout import HFGenerateEngine, SamplingConfig

    engine = trainer.datamodule.engine
    engine.sync_policy(pl_module.policy, trainer.global_step)
    builder = pl_module.prompt_builder
    prompt_ids = [builder.student_prompt_ids(p.problem) for p in trainer.datamodule.problems[:prompts]]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=tokens)
    ours = engine.generate(prompt_ids, greedy)
    hf = HFGenerateEngine()
    hf.setup(pl_module.policy, pl_module.tokenizer, model_path=pl_module.model_path, seed=0)
    training = pl_module.policy.training
    pl_module.policy.eval()
    try:
        reference = hf.generate(prompt_ids, greedy)
    finally:
        pl_module.policy.train(training)
    first_differences = [
        first_difference(x.completion_ids, y.completion_ids) for x, y in zip(ours, reference, strict=True)
    ]
    return {
        "prompts": len(prompt_ids),
        "tokens": tokens,
        "equal": sum(x.completion_ids == y.completion_ids for x, y in zip(ours, reference, strict=True)),
        "first_difference": first_differences,
    }


def first_difference(first: Any, second: Any) -> int | None:
    """The first position where two token sequences differ (a length difference counts), or ``None``."""
    for position, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return position
    return None if len(first) == len(second) else min(len(first), len(second))


def startup(out: Path, *, model: str, attention: str) -> dict[str, Any]:
    """The config's engine started as ``validate`` starts it: sized for the evaluation's 32,768 tokens."""
    import yaml

    from egrsd_pl.module import EGRSDModule
    from egrsd_pl.rollout import SamplingConfig
    from egrsd_pl.rollout.vllm import VLLMEngine

    config = yaml.safe_load((ROOT / "configs" / "egrsd.yaml").read_text())
    hparams = {**config["model"], "model_name_or_path": model, "attn_implementation": attention}
    module = EGRSDModule(**hparams)
    module.configure_model()
    module.policy.cuda()
    engine = VLLMEngine(**config["data"]["engine"]["init_args"])
    prompt = module.prompt_builder.student_prompt_ids("What is the sum of the first 100 positive integers?")
    engine.reserve_length(len(prompt) + config["evaluation"]["max_new_tokens"])
    started = time.perf_counter()
    engine.setup(module.policy, module.tokenizer, model_path=module.model_path, seed=0)
    record: dict[str, Any] = {"startup_s": time.perf_counter() - started}
    llm = engine._llm
    cache = llm.llm_engine.vllm_config.cache_config
    record.update(
        max_model_len=engine.max_sequence_length()[0],
        kv_cache_tokens=(cache.num_gpu_blocks or 0) * cache.block_size,
        evaluation_sequence_tokens=len(prompt) + config["evaluation"]["max_new_tokens"],
        device_in_use_gib=(torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) / 2**30,
    )
    engine.sync_policy(module.policy, 0)
    sample = engine.generate([prompt], SamplingConfig(temperature=0.0, max_new_tokens=16))
    record["generated_tokens"] = sample[0].length
    engine.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def table(out: Path) -> str:
    """Every record of ``out`` as markdown: one row per (run, rank, step), then the start-up at the cap."""
    lines = [
        "| run | rank | device ok | attention | step | step s | rollout s | peak allocated GiB | device peak GiB |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in sorted(out.glob("fit_*gpu_rank*.json")):
        record = json.loads(path.read_text())
        run = path.stem.split("_rank")[0]
        for step in record["steps"]:
            lines.append(
                f"| {run} | {record.get('rank', '?')} | {record['devices_ok']} | {record.get('attention', '?')} | "
                f"{step['step']} | {_number(step['time/step_s'])} | {_number(step['time/rollout_s'])} | "
                f"{_number(step['peak_allocated_gib'])} | {_number(step['device_peak_gib'])} |"
            )
        if "greedy" in record:
            greedy = record["greedy"]
            lines.append(
                f"\n{run} rank {record.get('rank')}: vLLM greedy = HF greedy on {greedy['equal']}/{greedy['prompts']} "
                f"prompts x {greedy['tokens']} tokens (first differences: {greedy['first_difference']})\n"
            )
    startup_file = out / "startup.json"
    if startup_file.is_file():
        record = json.loads(startup_file.read_text())
        lines.append(
            f"\nstart-up at the evaluation cap: max_model_len {record['max_model_len']:,}, KV cache "
            f"{record['kv_cache_tokens']:,} tokens ({record['kv_cache_tokens'] / record['evaluation_sequence_tokens']:.1f} "
            f"evaluation sequences), {record['device_in_use_gib']:.1f} GiB in use, {record['startup_s']:.0f} s"
        )
    if len(lines) == 2 and not startup_file.is_file():
        lines.append("| (no records) | | | | | | | | |")
    return "\n".join(lines)


def _gib(measure: Any) -> float:
    return measure() / 2**30


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["fit", "startup", "table"])
    parser.add_argument("--out", type=Path, required=True, help="folder of the records")
    parser.add_argument("--devices", type=int, default=1, help="fit: processes (GPUs)")
    parser.add_argument("--steps", type=int, default=3, help="fit: optimizer steps")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="model (default: random weights, Qwen3-4B's shape)"
    )
    parser.add_argument("--write", type=Path, help="table: also write the markdown here")
    parser.add_argument(
        "--config", default="configs/egrsd.yaml", help="fit: the config (relative to the repo)"
    )
    parser.add_argument(
        "--tag", default="", help="fit: names the run in its record and the table, e.g. fsdp2"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="fit: one more CLI override, e.g. --set=--data.batch_size=2",
    )
    args = parser.parse_args(argv)
    if args.devices < 1 or args.steps < 1:
        parser.error("--devices and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    attention = attention_implementation()
    if args.command == "fit":
        from egrsd_pl.cli import build_cli

        print(
            f"attention: {attention}"
            + ("" if attention == "flash_attention_2" else " (flash_attn not importable)")
        )
        arguments = fit_arguments(
            args.out,
            devices=args.devices,
            steps=args.steps,
            model=args.model,
            attention=attention,
            config=args.config,
            extra=tuple(args.set),
            tag=args.tag,
        )
        build_cli(arguments)
    elif args.command == "startup":
        print(json.dumps(startup(args.out, model=args.model, attention=attention), indent=2))
    else:
        text = table(args.out)
        print(text)
        if args.write:
            args.write.write_text(text + "\n")


if __name__ == "__main__":
    main()
