"""The paper configs' GPU settings: the collective timeout and vLLM's memory and scheduler limits.

Each config is parsed with the real CLI parser and its strategy and engine are instantiated from it;
the memory settings are checked against ``bench/gpu_memory_budget.py`` (computed from the models' shapes).
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from jsonargparse import Namespace
from jsonargparse._typehints import import_object

from egrsd_pl.cli import EGRSDCLI, build_cli

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted(
    p
    for p in [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "qwen3_8b").glob("*.yaml")]
    if "Qwen/Qwen3-" in p.read_text()
)


class ParseOnly(EGRSDCLI):
    def instantiate_classes(self) -> None:
        pass


def instantiate(component: Namespace):
    """A ``class_path`` / ``init_args`` value of the parsed config, built."""
    init_args = component.init_args.as_dict() if component.init_args is not None else {}
    return import_object(component.class_path)(**init_args)


def load_budget_script():
    spec = importlib.util.spec_from_file_location(
        "gpu_memory_budget", ROOT / "bench" / "gpu_memory_budget.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_every_paper_config_is_here():
    assert len(PAPER_CONFIGS) == 14  # 7 objectives x (Qwen3-4B, Qwen3-8B)


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_paper_config_strategy_waits_three_hours_and_engine_is_sized(config: Path):
    from lightning.pytorch.strategies import DDPStrategy

    from egrsd_pl.rollout.vllm import VLLMEngine

    cfg = build_cli(["--config", str(config)], run=False, cli_class=ParseOnly).config
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._timeout == timedelta(hours=3)  # Lightning's default: 30 minutes
    engine = instantiate(cfg.data.engine)
    assert isinstance(engine, VLLMEngine)
    qwen3_8b = "Qwen3-8B" in cfg.model.model_name_or_path
    assert engine.gpu_memory_utilization == (0.65 if qwen3_8b else 0.75)
    assert (engine.max_num_seqs, engine.max_num_batched_tokens) == (32, 8192)
    assert engine.enable_sleep_mode and engine.max_model_len is None
    assert engine.batch_invariant is False


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_paper_config_fits_an_80_gb_gpu_by_the_budget(config: Path):
    budget = load_budget_script()
    work = budget.workload(config.relative_to(ROOT), prompt_tokens=512, teacher_extra_tokens=4096)
    lines = budget.budget(work, budget.GPU_GIB_80GB)
    assert budget.fits(lines), lines
    # the KV cache holds a full evaluation sequence (512 + 32,768 tokens x 144 KiB) several times over
    assert lines["evaluation sequences the KV cache holds"] >= 5


def test_budget_arithmetic_by_hand():
    budget = load_budget_script()
    # Qwen3-4B/8B KV cache per token: 2 (K, V) x 36 layers x 8 KV heads x 128 x 2 bytes = 147,456 bytes.
    assert budget.kv_bytes_per_token("qwen3-4b") == budget.kv_bytes_per_token("qwen3-8b") == 147_456
    # published parameter counts (model cards: 4.0B, 8.2B)
    assert budget.parameters("qwen3-4b")["total"] == 4_022_468_096
    assert budget.parameters("qwen3-8b")["total"] == 8_190_735_360
    # LoRA r 64 on all 7 projections of Qwen3-8B: 64 x (8192 + 5120 + 5120 + 8192 + 3 x 16384) x 36 layers.
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (
        budget.lora_parameters("qwen3-8b", 64, targets) == 64 * (8192 + 5120 + 5120 + 8192 + 3 * 16384) * 36
    )


def test_budget_of_fsdp2_shards_all_but_the_head():
    budget = load_budget_script()
    # published parameter counts (model cards: 14.8B, 32.8B)
    assert round(budget.parameters("qwen3-14b")["total"] / 1e8) == 148
    assert round(budget.parameters("qwen3-32b")["total"] / 1e8) == 328
    work = budget.workload("configs/qwen3_8b/egrsd.yaml", prompt_tokens=512, teacher_extra_tokens=4096)
    ddp = budget.budget(work, budget.GPU_GIB_80GB)
    fsdp2 = budget.budget(work, budget.GPU_GIB_80GB, shard_size=8)
    head = 151_936 * 4096 * 2 / 2**30  # the replicated lm_head of Qwen3-8B, bf16: 1.16 GiB
    weights = ddp["student weights (bf16)"]
    assert fsdp2["student weights (bf16)"] == pytest.approx((weights - head) / 8 + head)
    assert fsdp2["LoRA weights + gradients + AdamW (fp32)"] == pytest.approx(
        ddp["LoRA weights + gradients + AdamW (fp32)"] / 8
    )
    # gathered during a step: 2 layers (each 4096 x (4096 + 2 x 1024 + 4096) + 3 x 4096 x 12288 + norms) and the
    # untied input embedding (the same size as the head)
    layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128
    assert fsdp2["gathered by FSDP2 during a step"] == pytest.approx((2 * layer * 2) / 2**30 + head)
    assert fsdp2["vLLM weights (bf16)"] == weights  # vLLM is not sharded (tensor parallel 1)
    # Qwen3-32B fits neither way at tensor parallel 1 (vLLM's whole copy leaves no KV cache); 14B fits both.
    text = budget.scaling_table(work, budget.GPU_GIB_80GB, 8)
    assert text.splitlines()[-1] == "| fits | yes | yes | yes | yes | yes | yes | **no** | **no** |"
