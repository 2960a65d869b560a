"""Per-GPU memory budget of a paper config: training step, rollouts and evaluation (computed, not measured).

    python bench/gpu_memory_budget.py                                   # every paper config, 80 GB GPUs
    python bench/gpu_memory_budget.py --config configs/qwen3_8b/egrsd.yaml --gpu-gib 139.8
    python bench/gpu_memory_budget.py --config configs/qwen3_32b/egrsd.yaml   # FSDP2 over 8, vLLM TP 2
    python bench/gpu_memory_budget.py --write budget.md                 # the table, as markdown
    python bench/gpu_memory_budget.py --scaling --shard-size 8 --tp 1 2 4 8   # DDP vs FSDP2 x vLLM TP, 4B to 32B

Everything is computed from the model's shape (``QWEN3_SHAPES`` of ``egrsd_pl/testbed/qwen3_shape.py``,
the real models' ``config.json`` values) and the config's own numbers (LoRA rank, batch, lengths, vLLM
engine settings). The per-model functions also take any Qwen3-style :class:`ModelShape`, e.g. one read
from a ``config.json`` (``tests/test_memory_budget_measured.py`` checks them against the tiny testbed on
CPU). The assumptions, each a line in the table:

- the student's base weights are bfloat16; PEFT keeps LoRA weights in float32 (``autocast_adapter_dtype``);
  AdamW holds two float32 moments per LoRA weight and the gradient is float32;
- gradient checkpointing stores each layer's input (bf16) and recomputes one layer at a time, whose
  activations are ~``4·hidden + 2·q_dim + 2·kv_dim + 4·intermediate`` bf16 values per token;
- vLLM holds its own bf16 copy of the weights, a KV cache of ``2 · layers · kv_heads · head_dim`` bf16
  values per token, an activation peak for ``max_num_batched_tokens`` (estimated like one recomputed
  layer plus the sampler's float32 logits for ``max_num_seqs``), CUDA graphs (``GRAPH_GIB``);
- a fixed ``OVERHEAD_GIB`` for the CUDA context, NCCL buffers and allocator slack; with sleep mode,
  ``ASLEEP_GIB`` that vLLM keeps while asleep (graph pools, workspaces outside its sleep allocator).

vLLM's KV cache is what is left of ``gpu_memory_utilization × GPU memory`` after its weights, activation
peak and graphs (vLLM 0.32 ``gpu_worker.determine_available_memory``), and vLLM refuses to start when
less than that share is free: the trainer's resident memory plus the overhead must fit in the rest.
Figures are GiB (2^30 bytes) per GPU; check them against ``bench/gpu_check.sh`` on a real GPU.

vLLM tensor parallel ``N`` (``--data.engine.init_args.tensor_parallel_size``, read from the config; 1: one
whole engine per GPU): one engine spans ``N`` GPUs (``N`` training ranks) and every line is still per GPU.
The assumptions it adds:

- weights: vLLM splits every linear layer ``N`` ways (q/o and the MLP by heads and columns, k/v by KV heads)
  and the input embedding and ``lm_head`` by vocabulary rows (vocab-parallel; 151,936 rows divide by 1 to 8);
  only the RMSNorm weights are whole on every GPU. With more GPUs than KV heads (``N`` > 8 for Qwen3) each
  GPU holds one whole KV head (vLLM replicates them), so k/v and the KV cache stop dividing at 8;
- KV cache: each GPU holds ``1/N`` of every sequence's KV (its KV heads), ``2 · layers · (kv_heads / N) ·
  head_dim`` bf16 values per token. "KV cache, one evaluation sequence" is a GPU's share of one sequence;
  "KV cache, one rollout step" is a GPU's share of the step's rollouts of the ``N`` ranks the engine serves;
- "evaluation sequences the KV cache holds" is **per training rank**: the evaluation sequences (prompt +
  ``evaluation.max_new_tokens``) the engine's KV cache holds at once, divided by the ``N`` ranks whose
  requests it serves (at ``N`` 1 the engine is the rank's own); "fits" asks for at least one. With ``N`` > 1
  the budget's next line gives the engine's whole count (the ``N`` ranks together);
- activation peak: the parts of a layer that are split by heads or columns (``2·q_dim + 2·kv_dim +
  4·intermediate``) divide by ``N``, the ``4·hidden`` values (residual stream, norms, all-reduced outputs)
  do not, and the sampler's float32 logits are whole on every GPU (vLLM all-gathers the vocab-parallel
  logits); CUDA graphs stay ``GRAPH_GIB`` and the tensor-parallel all-reduce buffers are in the overhead;
- the trainer does not change: the ranks of a tensor-parallel group are still data-parallel replicas.

``--scaling`` compares DDP with ``--trainer.strategy fsdp2`` (docs/fsdp.md) over ``--shard-size`` GPUs for
Qwen3-4B, 8B, 14B and 32B, each at the vLLM tensor-parallel sizes of ``--tp``, on the workload of one config
(default: the 8B EGRSD config): one table per model. Under FSDP2 the
trainer keeps ``1/N`` of the weights but the output head whole (replicated), plus, during a step, what
FSDP2 gathers: the running and the prefetched layer, and the root's input embedding (a separate tensor from
the head on 8B and larger). LoRA weights, gradients and AdamW moments are sharded too. Each column uses the
largest ``gpu_memory_utilization`` (in steps of 0.05) that leaves the trainer and the overhead room. Without
``--scaling``, a config whose strategy is ``fsdp2`` is budgeted as FSDP2 over ``--shard-size`` GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from egrsd_pl.testbed.qwen3_shape import HEAD_DIM, QWEN3_SHAPES  # noqa: E402
from egrsd_pl.testbed.qwen3_template import QWEN3_VOCAB_SIZE  # noqa: E402

GIB = 2**30
BF16, FP32 = 2, 4
OVERHEAD_GIB = 3.0  # CUDA context (~0.5), NCCL buffers, allocator fragmentation
GRAPH_GIB = 1.0  # vLLM's CUDA graphs (captured up to max_num_seqs)
ASLEEP_GIB = 1.5  # vLLM while asleep (sleep level 1): graph pools and buffers outside its sleep allocator
VOCAB_CHUNK = 16384  # rows of lm_head projected at once (egrsd_pl.losses.vocabulary default)
GPU_GIB_80GB = 79.2  # what torch reports for an 80 GB H100 / A100 (85.0e9 bytes)
PAPER_CONFIGS = sorted(
    str(p.relative_to(ROOT))
    for p in [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "qwen3_8b").glob("*.yaml")]
    if "Qwen/Qwen3-" in p.read_text()
)


@dataclass(frozen=True)
class ModelShape:
    """What the budget reads of a Qwen3-style backbone (fields named as in ``QWEN3_SHAPES``; head dim and
    vocabulary default to Qwen3's)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_embeddings: bool
    head_dim: int = HEAD_DIM
    vocab_size: int = QWEN3_VOCAB_SIZE

    @classmethod
    def named(cls, model: str) -> ModelShape:
        """A real model's shape: ``qwen3-4b``, ``qwen3-8b``, ``qwen3-14b`` or ``qwen3-32b``."""
        shape = QWEN3_SHAPES[model]
        return cls(**{**shape, "tie_embeddings": bool(shape["tie_embeddings"])})

    @classmethod
    def from_config(cls, path: str | Path) -> ModelShape:
        """The shape in a model folder's ``config.json`` (or that file); head dim and tied embeddings
        default as in ``Qwen3Config`` (128, untied)."""
        path = Path(path)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        return cls(
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config["num_key_value_heads"],
            intermediate_size=config["intermediate_size"],
            tie_embeddings=config.get("tie_word_embeddings", False),
            head_dim=config.get("head_dim", HEAD_DIM),
            vocab_size=config["vocab_size"],
        )


Model = str | ModelShape  # a name of ``QWEN3_SHAPES``, or a shape


def shape_of(model: Model) -> ModelShape:
    """The shape of a named model; a shape as it is."""
    return model if isinstance(model, ModelShape) else ModelShape.named(model)


@dataclass(frozen=True)
class Workload:
    """The numbers of one config that memory depends on."""

    model: Model  # "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b" or a ModelShape
    lora_rank: int
    lora_targets: tuple[str, ...]
    teacher_adapter: bool  # a second (frozen-gradient) LoRA adapter: every schedule but "frozen"
    sequences: int  # rollouts per rank per optimizer step (batch_size x num_rollouts)
    prompt_tokens: int  # assumed student prompt length
    teacher_extra_tokens: int  # assumed reference-solution length added to the teacher prompt
    completion_tokens: int  # data.max_new_tokens
    eval_completion_tokens: int  # evaluation.max_new_tokens
    logit_chunk: int  # model.logit_chunk_size
    utilization: float  # engine gpu_memory_utilization
    max_num_seqs: int  # engine max_num_seqs
    max_num_batched_tokens: int  # engine max_num_batched_tokens
    tensor_parallel: int = 1  # engine tensor_parallel_size: GPUs (training ranks) one vLLM engine spans
    fsdp2: bool = False  # trainer.strategy fsdp2: the trainer's weights sharded (budget's shard_size)


def parameters(model: Model) -> dict[str, int]:
    """Parameter counts of the backbone (``total``) and the pieces the budget needs."""
    shape = shape_of(model)
    hidden, layers, inter = shape.hidden_size, shape.num_layers, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    per_layer = (
        hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * inter + 2 * hidden + 2 * shape.head_dim
    )
    embedding = shape.vocab_size * hidden
    head = 0 if shape.tie_embeddings else embedding
    return {
        "total": embedding + head + layers * per_layer + hidden,
        "q_dim": q_dim,
        "kv_dim": kv_dim,
        "per_layer": per_layer,
        "embedding": embedding,
    }


def lora_parameters(model: Model, rank: int, targets: tuple[str, ...]) -> int:
    """``rank · (in + out)`` per targeted projection and layer."""
    shape = shape_of(model)
    hidden, inter = shape.hidden_size, shape.intermediate_size
    dims = parameters(model)
    q_dim, kv_dim = dims["q_dim"], dims["kv_dim"]
    sizes = {
        "q_proj": (hidden, q_dim),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (q_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return shape.num_layers * sum(rank * sum(sizes[name]) for name in targets)


def check_tensor_parallel(model: Model, tensor_parallel: int) -> None:
    """Raises unless vLLM can split ``model`` ``tensor_parallel`` ways (its Qwen3 attention's own checks)."""
    shape = shape_of(model)
    heads, kv_heads = shape.num_heads, shape.num_kv_heads
    if (
        tensor_parallel < 1
        or heads % tensor_parallel
        or (kv_heads % tensor_parallel if tensor_parallel <= kv_heads else tensor_parallel % kv_heads)
    ):
        raise ValueError(
            f"{model}: vLLM cannot split {heads} attention heads / {kv_heads} KV heads {tensor_parallel} ways"
        )


def kv_heads_per_gpu(model: Model, tensor_parallel: int = 1) -> int:
    """KV heads one GPU holds: split ``tensor_parallel`` ways, at least one (vLLM replicates past that)."""
    check_tensor_parallel(model, tensor_parallel)
    return max(1, shape_of(model).num_kv_heads // tensor_parallel)


def vllm_weight_parameters(model: Model, tensor_parallel: int = 1) -> float:
    """Parameters one GPU of a vLLM engine holds: all but the RMSNorm weights split ``tensor_parallel`` ways
    (linear layers by heads / columns, embedding and head by vocabulary rows), k/v by KV heads."""
    shape = shape_of(model)
    dims = parameters(model)
    hidden, layers = shape.hidden_size, shape.num_layers
    norms = layers * (2 * hidden + 2 * shape.head_dim) + hidden  # input/post-attention, q/k norms; final norm
    kv = layers * 2 * hidden * dims["kv_dim"]  # k_proj and v_proj
    kv_per_gpu = kv * kv_heads_per_gpu(model, tensor_parallel) / shape.num_kv_heads
    return norms + (dims["total"] - norms - kv) / tensor_parallel + kv_per_gpu


def kv_bytes_per_token(model: Model, tensor_parallel: int = 1) -> int:
    """KV cache bytes of one token on one GPU (its share of the KV heads)."""
    shape = shape_of(model)
    return 2 * shape.num_layers * kv_heads_per_gpu(model, tensor_parallel) * shape.head_dim * BF16


def layer_activation_bytes_per_token(model: Model, tensor_parallel: int = 1) -> float:
    """One layer's activations per token; under tensor parallel the head- and column-split parts divide."""
    shape = shape_of(model)
    dims = parameters(model)
    split = 2 * dims["q_dim"] + 4 * shape.intermediate_size
    kv = 2 * kv_heads_per_gpu(model, tensor_parallel) * shape.head_dim
    if tensor_parallel == 1:
        return (4 * shape.hidden_size + split + kv) * BF16
    return (4 * shape.hidden_size + split / tensor_parallel + kv) * BF16


def budget(work: Workload, gpu_gib: float, shard_size: int = 1) -> dict[str, float]:
    """Every line of the budget, GiB per GPU; ``shard_size`` > 1: FSDP2 over that many GPUs (1: DDP)."""
    shape = shape_of(work.model)
    dims = parameters(work.model)
    tp = work.tensor_parallel
    weights = dims["total"] * BF16 / GIB
    vllm_weights = vllm_weight_parameters(work.model, tp) * BF16 / GIB  # one GPU's share of the engine
    head = dims["embedding"] * BF16 / GIB  # replicated under FSDP2
    trainer_weights = weights if shard_size == 1 else (weights - head) / shard_size + head
    gathered = 0.0  # what FSDP2 all-gathers during a step: 2 layers, and the root's own embedding if untied
    if shard_size > 1:
        gathered = (2 * dims["per_layer"] + (0 if shape.tie_embeddings else dims["embedding"])) * BF16 / GIB
    lora = lora_parameters(work.model, work.lora_rank, work.lora_targets) / shard_size
    student_adapter = lora * (FP32 + FP32 + 2 * FP32) / GIB  # weight, gradient, AdamW moments
    teacher_adapter = lora * FP32 / GIB if work.teacher_adapter else 0.0
    student_tokens = work.sequences * (work.prompt_tokens + work.completion_tokens)
    teacher_tokens = work.sequences * (
        work.prompt_tokens + work.teacher_extra_tokens + work.completion_tokens
    )
    checkpoints = student_tokens * shape.num_layers * shape.hidden_size * BF16 / GIB
    recompute = student_tokens * layer_activation_bytes_per_token(work.model) / GIB
    teacher_pass = teacher_tokens * layer_activation_bytes_per_token(work.model) / GIB  # no grad: one layer
    vocab_block = min(VOCAB_CHUNK, shape.vocab_size)
    vocabulary = 4 * work.logit_chunk * vocab_block * FP32 / GIB  # logits + weights buffers, both sides
    completion_hidden = 2 * work.sequences * work.completion_tokens * shape.hidden_size * FP32 / GIB
    activations = checkpoints + max(recompute, teacher_pass) + vocabulary + completion_hidden
    vllm_share = work.utilization * gpu_gib
    vllm_activations = (
        work.max_num_batched_tokens * layer_activation_bytes_per_token(work.model, tp)
        + work.max_num_seqs * shape.vocab_size * FP32 * 2
    ) / GIB
    kv_cache = vllm_share - vllm_weights - vllm_activations - GRAPH_GIB
    kv_token = kv_bytes_per_token(work.model, tp)  # this GPU's share of a token's KV
    rollout_tokens = work.sequences * (work.prompt_tokens + work.completion_tokens)
    eval_sequence = work.prompt_tokens + work.eval_completion_tokens
    trainer_resident = trainer_weights + student_adapter - lora * FP32 / GIB + teacher_adapter  # no gradients
    fsdp_lines = {"gathered by FSDP2 during a step": gathered} if shard_size > 1 else {}
    # the engine's evaluation sequences (each GPU holds its share of every one) over the tp ranks it serves
    per_rank = kv_cache * GIB / (eval_sequence * kv_token) / tp
    tp_lines = (
        {f"evaluation sequences the engine holds (its {tp} ranks together)": per_rank * tp} if tp > 1 else {}
    )
    return {
        "student weights (bf16)": trainer_weights,
        **fsdp_lines,
        "LoRA weights + gradients + AdamW (fp32)": student_adapter,
        "teacher adapter (fp32)": teacher_adapter,
        "activations of a step (checkpointing)": activations,
        "overhead (context, NCCL, slack)": OVERHEAD_GIB,
        "vLLM asleep": ASLEEP_GIB,
        "training step peak": trainer_weights
        + gathered
        + student_adapter
        + teacher_adapter
        + activations
        + OVERHEAD_GIB
        + ASLEEP_GIB,
        "trainer resident while vLLM runs": trainer_resident,
        "vLLM share (utilization x GPU)": vllm_share,
        "vLLM weights (bf16)": vllm_weights,
        "vLLM activations + sampler": vllm_activations,
        "vLLM CUDA graphs": GRAPH_GIB,
        "KV cache": kv_cache,
        "generation peak": trainer_resident + OVERHEAD_GIB + vllm_share,
        "KV cache, one rollout step (GiB)": tp * rollout_tokens * kv_token / GIB,
        "KV cache, one evaluation sequence (GiB)": eval_sequence * kv_token / GIB,
        "evaluation sequences the KV cache holds": per_rank,
        **tp_lines,
        "GPU memory": gpu_gib,
    }


def workload(config_path: str | Path, *, prompt_tokens: int, teacher_extra_tokens: int) -> Workload:
    """The :class:`Workload` of a paper config (read as YAML; defaults are the module's and the engine's)."""
    config = yaml.safe_load(Path(ROOT, config_path).read_text())
    model, data = config["model"], config["data"]
    engine = data["engine"]["init_args"]
    name = model["model_name_or_path"].split("/")[-1].lower()
    return Workload(
        model=name,
        lora_rank=model["lora_rank"],
        lora_targets=tuple(model["lora_target_modules"]),
        teacher_adapter=config.get("teacher", {}).get("schedule", "frozen") != "frozen",
        sequences=data["batch_size"] * data.get("num_rollouts", 1),
        prompt_tokens=prompt_tokens,
        teacher_extra_tokens=teacher_extra_tokens,
        completion_tokens=data["max_new_tokens"],
        eval_completion_tokens=config["evaluation"]["max_new_tokens"],
        logit_chunk=model.get("logit_chunk_size", 1024),
        utilization=engine["gpu_memory_utilization"],
        max_num_seqs=engine["max_num_seqs"],
        max_num_batched_tokens=engine["max_num_batched_tokens"],
        tensor_parallel=engine.get("tensor_parallel_size", 1),
        fsdp2=config.get("trainer", {}).get("strategy") == "fsdp2",
    )


def fits(lines: dict[str, float]) -> bool:
    """Both phases fit the GPU, and the KV cache holds at least one evaluation sequence per training rank."""
    gpu = lines["GPU memory"]
    return (
        lines["training step peak"] <= gpu
        and lines["generation peak"] <= gpu
        and lines["evaluation sequences the KV cache holds"] >= 1
    )


def merged_lines(columns: list[dict[str, float]]) -> list[str]:
    """Every column's lines in order; a line only some columns have goes after the line before it."""
    merged: list[str] = []
    for lines in columns:
        previous = -1
        for line in lines:
            if line not in merged:
                merged.insert(previous + 1, line)
            previous = merged.index(line)
    return merged


def table(
    configs: list[str],
    gpu_gib: float,
    prompt_tokens: int,
    teacher_extra_tokens: int,
    shard_size: int = 8,
) -> str:
    """One column per config; a config with ``strategy: fsdp2`` is budgeted over ``shard_size`` GPUs."""
    by_model: dict[str, dict[str, float]] = {}
    for path in configs:
        work = workload(path, prompt_tokens=prompt_tokens, teacher_extra_tokens=teacher_extra_tokens)
        shard = shard_size if work.fsdp2 else 1
        name = f"{work.model} ({path}"
        name += f", FSDP2 /{shard}" if work.fsdp2 else ""
        name += f", vLLM TP {work.tensor_parallel})" if work.tensor_parallel > 1 else ")"
        by_model.setdefault(name, budget(work, gpu_gib, shard))
    names = list(by_model)
    rows = [f"| GiB per GPU | {' | '.join(names)} |", f"| --- | {' | '.join('---:' for _ in names)} |"]
    for line in merged_lines(list(by_model.values())):
        values = " | ".join(
            f"{by_model[name][line]:.2f}" if line in by_model[name] else "—" for name in names
        )
        rows.append(f"| {line} | {values} |")
    verdict = " | ".join("yes" if fits(by_model[name]) else "**no**" for name in names)
    rows.append(f"| fits | {verdict} |")
    return "\n".join(rows)


SCALING_MODELS = ("qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b")
SCALING_TENSOR_PARALLEL = (1, 2, 4, 8)
# (line of the budget, its label in the --scaling table)
SCALING_LINES = (
    ("student weights (bf16)", "student weights (bf16)"),
    ("LoRA weights + gradients + AdamW (fp32)", "LoRA weights + gradients + AdamW (fp32)"),
    ("activations of a step (checkpointing)", "activations of a step (checkpointing)"),
    ("training step peak", "training step peak"),
    ("trainer resident while vLLM runs", "trainer resident while vLLM runs"),
    ("vLLM weights (bf16)", "vLLM weights (bf16, this GPU's share)"),
    ("vLLM activations + sampler", "vLLM activations + sampler"),
    ("KV cache", "KV cache"),
    ("KV cache, one rollout step (GiB)", "KV cache, one rollout step of the engine's ranks"),
    ("KV cache, one evaluation sequence (GiB)", "KV cache, this GPU's share of one evaluation sequence"),
    ("generation peak", "generation peak"),
    ("evaluation sequences the KV cache holds", "evaluation sequences the KV cache holds, per training rank"),
)


def largest_utilization(work: Workload, gpu_gib: float, shard_size: int) -> float:
    """The largest ``gpu_memory_utilization`` (steps of 0.05, at most 0.95) whose generation peak fits."""
    for hundredths in range(95, 0, -5):
        utilization = hundredths / 100
        lines = budget(replace(work, utilization=utilization), gpu_gib, shard_size)
        if lines["generation peak"] <= gpu_gib:
            return utilization
    return 0.05


def scaling_columns(
    work: Workload,
    gpu_gib: float,
    shard_size: int,
    tensor_parallel: tuple[int, ...] = SCALING_TENSOR_PARALLEL,
) -> dict[str, list[tuple[str, dict[str, float], float]]]:
    """Per model: ``(column name, budget lines, gpu_memory_utilization)`` for DDP and FSDP2 over ``shard_size``
    GPUs, each at every vLLM tensor-parallel size, on ``work``'s lengths and LoRA."""
    tables: dict[str, list[tuple[str, dict[str, float], float]]] = {}
    for model in SCALING_MODELS:
        for size in tensor_parallel:
            check_tensor_parallel(model, size)
        columns = tables.setdefault(model, [])
        for name, shard in (("DDP", 1), (f"FSDP2 /{shard_size}", shard_size)):
            for size in tensor_parallel:
                sized = replace(work, model=model, tensor_parallel=size)
                utilization = largest_utilization(sized, gpu_gib, shard)
                lines = budget(replace(sized, utilization=utilization), gpu_gib, shard)
                columns.append((f"{name} TP {size}", lines, utilization))
    return tables


def scaling_table(
    work: Workload,
    gpu_gib: float,
    shard_size: int,
    tensor_parallel: tuple[int, ...] = SCALING_TENSOR_PARALLEL,
) -> str:
    """DDP vs FSDP2 over ``shard_size`` GPUs at each vLLM tensor-parallel size: one markdown table per model."""
    tables = []
    for model, columns in scaling_columns(work, gpu_gib, shard_size, tensor_parallel).items():
        rows = [
            f"| {model}, GiB per GPU | {' | '.join(name for name, _, _ in columns)} |",
            f"| --- | {' | '.join('---:' for _ in columns)} |",
            f"| gpu_memory_utilization | {' | '.join(f'{u:.2f}' for _, _, u in columns)} |",
        ]
        for line, label in SCALING_LINES:
            rows.append(f"| {label} | {' | '.join(f'{lines[line]:.2f}' for _, lines, _ in columns)} |")
        rows.append(f"| fits | {' | '.join('yes' if fits(lines) else '**no**' for _, lines, _ in columns)} |")
        tables.append("\n".join(rows))
    return "\n\n".join(tables)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", help="config file(s); default: egrsd 4B and 8B")
    parser.add_argument("--gpu-gib", type=float, default=GPU_GIB_80GB, help="GPU memory in GiB (80 GB: 79.2)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="assumed student prompt length")
    parser.add_argument("--teacher-extra-tokens", type=int, default=4096, help="assumed reference solution")
    parser.add_argument("--write", help="also write the table (markdown) to this file")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="DDP vs FSDP2 at each --tp for Qwen3-4B/8B/14B/32B on the first config's workload",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=8,
        help="GPUs FSDP2 shards over (--scaling, and configs under fsdp2)",
    )
    parser.add_argument(
        "--tp",
        type=int,
        nargs="+",
        default=list(SCALING_TENSOR_PARALLEL),
        help="vLLM tensor-parallel sizes of --scaling (default: 1 2 4 8)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.scaling:
        config = (args.config or ["configs/qwen3_8b/egrsd.yaml"])[0]
        work = workload(
            config, prompt_tokens=args.prompt_tokens, teacher_extra_tokens=args.teacher_extra_tokens
        )
        try:
            text = scaling_table(work, args.gpu_gib, args.shard_size, tuple(args.tp))
        except ValueError as error:  # a --tp size vLLM cannot split a model by
            raise SystemExit(f"--tp: {error}") from None
    else:
        configs = args.config or ["configs/egrsd.yaml", "configs/qwen3_8b/egrsd.yaml"]
        text = table(configs, args.gpu_gib, args.prompt_tokens, args.teacher_extra_tokens, args.shard_size)
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")
    return {"table": text}


if __name__ == "__main__":
    main()
