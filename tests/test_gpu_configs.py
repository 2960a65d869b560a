"""The paper configs' GPU settings: the collective timeout and vLLM's memory and scheduler limits.

Each config is parsed with the real CLI parser and its strategy and engine are instantiated from it;
the memory settings are checked against ``bench/gpu_memory_budget.py`` (computed from the models' shapes).
The FSDP2 configs (``configs/qwen3_14b/``, ``configs/qwen3_32b/``) are checked against its ``--scaling`` table,
vLLM tensor parallel included.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
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
FSDP2_CONFIGS = sorted(
    [*(ROOT / "configs" / "qwen3_14b").glob("*.yaml"), *(ROOT / "configs" / "qwen3_32b").glob("*.yaml")]
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
    text = budget.scaling_table(work, budget.GPU_GIB_80GB, 8, (1,))
    assert scaling_verdicts(text) == {
        "qwen3-4b": {"DDP TP 1": "yes", "FSDP2 /8 TP 1": "yes"},
        "qwen3-8b": {"DDP TP 1": "yes", "FSDP2 /8 TP 1": "yes"},
        "qwen3-14b": {"DDP TP 1": "yes", "FSDP2 /8 TP 1": "yes"},
        "qwen3-32b": {"DDP TP 1": "**no**", "FSDP2 /8 TP 1": "**no**"},
    }


def scaling_verdicts(text: str) -> dict[str, dict[str, str]]:
    """The ``fits`` row of each model's table of ``--scaling``, by column."""
    verdicts = {}
    for block in text.split("\n\n"):
        rows = [[cell.strip() for cell in row.strip("|").split("|")] for row in block.splitlines()]
        model = rows[0][0].removesuffix(", GiB per GPU")
        (fits,) = [row for row in rows if row[0] == "fits"]
        verdicts[model] = dict(zip(rows[0][1:], fits[1:], strict=True))
    return verdicts


def test_budget_under_vllm_tensor_parallel_by_hand():
    budget = load_budget_script()
    # Qwen3-32B's vLLM weights on one GPU at tensor parallel 4 (hidden 5120, 64 layers, 64 query / 8 KV heads of
    # 128, MLP 25600, untied head): every linear layer and the vocab-parallel embedding and head split 4 ways,
    # the RMSNorm weights whole.
    #   linear per layer: 5120 x 8192 (q) + 2 x 5120 x 1024 (k, v) + 8192 x 5120 (o) + 3 x 5120 x 25600 (MLP)
    #                     = 487,587,840, / 4 = 121,896,960; norms per layer 2 x 5120 + 2 x 128 = 10,496
    #   embedding and head: 2 x 151,936 x 5120 = 1,555,824,640, / 4 = 388,956,160; final norm 5,120
    #   64 x (121,896,960 + 10,496) + 388,956,160 + 5,120 = 8,191,038,464 parameters x 2 bytes = 15.26 GiB
    assert budget.vllm_weight_parameters("qwen3-32b", 4) == 8_191_038_464
    work = budget.workload("configs/qwen3_8b/egrsd.yaml", prompt_tokens=512, teacher_extra_tokens=4096)
    work = replace(work, model="qwen3-32b", tensor_parallel=4, utilization=0.8)
    lines = budget.budget(work, budget.GPU_GIB_80GB, shard_size=8)
    assert lines["vLLM weights (bf16)"] == pytest.approx(8_191_038_464 * 2 / 2**30)
    assert round(lines["vLLM weights (bf16)"], 2) == 15.26
    # at tensor parallel 1 a GPU holds the whole model, the parameter count of the model card
    assert budget.vllm_weight_parameters("qwen3-32b", 1) == budget.parameters("qwen3-32b")["total"]
    # KV cache per token and GPU: 2 (K, V) x 64 layers x 8 KV heads x 128 x 2 bytes = 262,144 bytes, / 4 GPUs;
    # past 8 GPUs vLLM replicates the KV heads (one per GPU), so it stops dividing
    assert budget.kv_bytes_per_token("qwen3-32b") == 262_144
    assert budget.kv_bytes_per_token("qwen3-32b", 4) == 65_536
    assert budget.kv_bytes_per_token("qwen3-32b", 16) == budget.kv_bytes_per_token("qwen3-32b", 8) == 32_768
    with pytest.raises(ValueError, match="cannot split 40 attention heads / 8 KV heads 16 ways"):
        budget.check_tensor_parallel("qwen3-14b", 16)
    # the evaluation sequences are per training rank: the engine's count (its 4 GPUs' KV caches, each holding a
    # quarter of every sequence) over the 4 ranks it serves
    sequence = (512 + 32_768) * 65_536 / 2**30
    engine = lines["evaluation sequences the engine holds (its 4 ranks together)"]
    assert engine == pytest.approx(lines["KV cache"] / sequence)
    assert lines["evaluation sequences the KV cache holds"] == pytest.approx(engine / 4)
    # the trainer's lines do not depend on vLLM's tensor parallel
    whole = budget.budget(replace(work, tensor_parallel=1), budget.GPU_GIB_80GB, shard_size=8)
    for line in ("training step peak", "trainer resident while vLLM runs", "generation peak"):
        assert lines[line] == whole[line]


def test_qwen3_32b_fits_80_gb_gpus_from_vllm_tensor_parallel_2_under_fsdp2_only():
    budget = load_budget_script()
    work = budget.workload("configs/qwen3_8b/egrsd.yaml", prompt_tokens=512, teacher_extra_tokens=4096)
    verdicts = scaling_verdicts(budget.scaling_table(work, budget.GPU_GIB_80GB, 8))
    assert verdicts["qwen3-32b"] == {
        "DDP TP 1": "**no**",  # DDP's training step alone (83.6 GiB) is past 79.2 GiB
        "DDP TP 2": "**no**",
        "DDP TP 4": "**no**",
        "DDP TP 8": "**no**",
        "FSDP2 /8 TP 1": "**no**",
        "FSDP2 /8 TP 2": "yes",
        "FSDP2 /8 TP 4": "yes",
        "FSDP2 /8 TP 8": "yes",
    }
    for model in ("qwen3-4b", "qwen3-8b", "qwen3-14b"):
        assert set(verdicts[model].values()) == {"yes"}, model


def test_every_fsdp2_config_is_here():
    assert [str(p.relative_to(ROOT / "configs")) for p in FSDP2_CONFIGS] == [
        "qwen3_14b/cl_egrsd.yaml",
        "qwen3_14b/egrsd.yaml",
        "qwen3_32b/cl_egrsd.yaml",
        "qwen3_32b/egrsd.yaml",
    ]


@pytest.mark.parametrize("config", FSDP2_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_fsdp2_config_waits_three_hours_and_engine_is_sized_by_the_scaling_table(config: Path):
    from egrsd_pl.rollout.vllm import VLLMEngine
    from egrsd_pl.sharding import FSDP2Strategy

    cfg = build_cli(["--config", str(config)], run=False, cli_class=ParseOnly).config
    assert cfg.trainer.strategy == "fsdp2"
    strategy = FSDP2Strategy(**cfg.fsdp2.as_dict())
    assert strategy._timeout == timedelta(hours=3)
    assert strategy.replicate_size == "auto"
    engine = instantiate(cfg.data.engine)
    assert isinstance(engine, VLLMEngine)
    assert (engine.max_num_seqs, engine.max_num_batched_tokens) == (32, 8192)
    assert engine.enable_sleep_mode and engine.max_model_len is None
    assert engine.batch_invariant is False and engine.sync == "merged"
    # the smallest vLLM tensor parallel that fits under FSDP2 over 8 GPUs, and the largest utilization that
    # leaves the trainer room at it (bench/gpu_memory_budget.py --scaling)
    budget = load_budget_script()
    work = budget.workload(config.relative_to(ROOT), prompt_tokens=512, teacher_extra_tokens=4096)
    assert work.fsdp2 and work.tensor_parallel == engine.tensor_parallel_size
    gpu = budget.GPU_GIB_80GB
    fitting = []
    for size in (1, 2, 4, 8):
        sized = replace(work, tensor_parallel=size)
        sized = replace(sized, utilization=budget.largest_utilization(sized, gpu, 8))
        if budget.fits(budget.budget(sized, gpu, shard_size=8)):
            fitting.append(size)
    qwen3_32b = "Qwen3-32B" in cfg.model.model_name_or_path
    assert engine.tensor_parallel_size == fitting[0] == (2 if qwen3_32b else 1)
    assert 8 % engine.tensor_parallel_size == 0  # a group never spans two nodes of 8 GPUs
    assert engine.gpu_memory_utilization == budget.largest_utilization(work, gpu, 8)
    assert engine.gpu_memory_utilization == (0.80 if qwen3_32b else 0.85)


@pytest.mark.parametrize("config", FSDP2_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_fsdp2_config_fits_an_80_gb_gpu_by_the_budget(config: Path):
    budget = load_budget_script()
    work = budget.workload(config.relative_to(ROOT), prompt_tokens=512, teacher_extra_tokens=4096)
    lines = budget.budget(work, budget.GPU_GIB_80GB, shard_size=8)
    assert budget.fits(lines), lines
    # per training rank, the KV cache holds a full evaluation sequence (512 + 32,768 tokens) several times over:
    # 7.3 for 14B (tensor parallel 1), 3.8 for 32B (tensor parallel 2: 7.5 for the engine of the pair)
    assert lines["evaluation sequences the KV cache holds"] >= 3
    # the budget's own table of the config (per-config mode) says the same
    assert budget.table([str(config.relative_to(ROOT))], budget.GPU_GIB_80GB, 512, 4096).endswith(
        "| fits | yes |"
    )
