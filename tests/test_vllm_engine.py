"""VLLMEngine: on-policy after every optimizer step (token ids equal HF's), one sync per step,
per-request seeds, clean teardown. vLLM tests carry the ``vllm`` marker and skip without vLLM."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from egrsd_pl.rollout import HFGenerateEngine, SamplingConfig

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------- without vLLM


def test_missing_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from egrsd_pl.rollout import vllm as module

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        module.importlib.util, "find_spec", lambda name: None if name == "vllm" else real_find_spec(name)
    )
    with pytest.raises(ImportError) as error:
        module.VLLMEngine()
    message = str(error.value)
    assert "\n" not in message
    assert "pip install 'egrsd-pl[gpu]'" in message and "'egrsd-pl[cpu]'" in message


def test_importing_the_package_does_not_import_vllm() -> None:
    code = "import sys, egrsd_pl.rollout as r; assert 'vllm' not in sys.modules; assert r.VLLMEngine.__name__"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        (dict(sync="lora"), "sync"),
        (dict(sync="merged", in_process=False), "in_process"),
        (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
        (dict(dtype="fp8"), "dtype"),
        (dict(sleep_level=2, sync="adapter"), "sleep_level"),
        (dict(kv_cache_space_gib=0), "kv_cache_space_gib"),
    ],
)
def test_constructor_names_the_bad_flag(kwargs: dict, flag: str) -> None:
    from egrsd_pl.rollout.vllm import VLLMEngine

    with pytest.raises(ValueError, match=flag):
        VLLMEngine(**kwargs)


# ---------------------------------------------------------------------------- with vLLM


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The testbed's seeded *untrained* tiny Qwen3 (``budget_s=0``), not the session's warm-started
    ``tiny_model_dir``: that one is trained for a wall-clock budget, so its weights depend on the
    machine's load, while these token-exact tests need the same weights everywhere."""
    from egrsd_pl.testbed import build_testbed

    return str(
        build_testbed(tmp_path_factory.mktemp("untrained"), budget_s=0, progress=False, eval_problems=0)
    )


@pytest.fixture
def student(model_dir: str):  # type: ignore[no-untyped-def]
    """(PEFT student in float32, tokenizer, 8 prompts, their short targets ``\\boxed{answer}<|im_end|>``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from egrsd_pl.prompts import PromptBuilder
    from egrsd_pl.testbed.synthetic import synthetic_problems

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(base, config)
    builder = PromptBuilder(tokenizer)
    problems = synthetic_problems(8, seed=3, split="test")
    prompts = [builder.student_prompt_ids(p.problem) for p in problems]
    targets = [
        tokenizer.encode(f"\\boxed{{{p.answer}}}", add_special_tokens=False) + [tokenizer.eos_token_id]
        for p in problems
    ]
    return model, tokenizer, prompts, targets


def optimizer_steps(model, prompts, targets, optimizer, steps: int) -> None:  # type: ignore[no-untyped-def]
    """Real AdamW steps of supervised loss on ``targets``: the adapter stops being a no-op and learns
    to answer and stop, so greedy completions end with ``<|im_end|>`` and have clear top-1 margins."""
    width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, T]
    labels = torch.full_like(input_ids, -100)  # [B, T]
    attention_mask = torch.zeros_like(input_ids)  # [B, T]
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        sequence = prompt + target
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        labels[row, len(prompt) : len(sequence)] = torch.tensor(target)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.vllm
@requires_vllm
@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_greedy_matches_hf_after_each_optimizer_step(student, model_dir: str, sync: str) -> None:  # type: ignore[no-untyped-def]
    from egrsd_pl.rollout.vllm import VLLMEngine

    model, tokenizer, prompts, targets = student
    hf = HFGenerateEngine()
    hf.setup(model, tokenizer, model_path=model_dir, seed=0)
    engine = VLLMEngine(sync=sync, max_lora_rank=8, enforce_eager=True)  # no compile: quick start
    set_num_threads = torch.set_num_threads
    engine.setup(model, tokenizer, model_path=model_dir, seed=0)
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    try:
        assert torch.set_num_threads is set_num_threads  # vLLM's process-wide no-op patch is undone
        with pytest.raises(RuntimeError, match="sync_policy"):
            engine.generate(prompts, greedy)
        for step, steps_taken in ((1, 12), (2, 3)):
            optimizer_steps(model, prompts, targets, optimizer, steps_taken)
            engine.sync_policy(model, step)
            engine.sync_policy(model, step)  # a second call in the same step is a no-op
            assert (engine.sync_count, engine.synced_step) == (step, step)
            ours, reference = engine.generate(prompts, greedy), hf.generate(prompts, greedy)
            assert [r.completion_ids for r in ours] == [r.completion_ids for r in reference]
            assert [r.truncated for r in ours] == [r.truncated for r in reference]
            assert [r.text for r in ours] == [r.text for r in reference]
            assert [r.prompt_index for r in ours] == list(range(8))
        # 15 steps teach "\boxed{...}<|im_end|>": a completion that stopped keeps its stop token, as the HF
        # engine keeps it (how many stop within 16 tokens depends on the float order of the 15 steps: at least one)
        stopped = [r for r in ours if not r.truncated]
        assert stopped and all(r.completion_ids[-1] == tokenizer.eos_token_id for r in stopped)
        short = SamplingConfig(temperature=0.0, max_new_tokens=3)
        ours, reference = engine.generate(prompts, short), hf.generate(prompts, short)
        assert [r.completion_ids for r in ours] == [r.completion_ids for r in reference]
        assert all(r.truncated and r.length == 3 for r in ours)
        base_after = model.get_base_model().state_dict()
        assert all(
            torch.equal(base_after[k], v) for k, v in base_before.items()
        )  # sync never touches the base
    finally:
        engine.close()
    assert not torch.distributed.is_initialized()  # vLLM's own world-1 group is gone: DDP can init later


@pytest.mark.vllm
@requires_vllm
def test_seeds_and_teardown_under_a_trainer_process_group(student, model_dir: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As under Lightning DDP: the default group exists before the engine and survives ``close``."""
    from egrsd_pl.rollout.vllm import VLLMEngine

    model, tokenizer, prompts, _ = student
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    # a 128-token step budget: 3 prompts of ~55 tokens x 2 rollouts cannot prefill in one step
    engine = VLLMEngine(enforce_eager=True, max_model_len=128, max_num_batched_tokens=128)
    try:
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        engine.setup(model, tokenizer, model_path=model_dir, seed=5)
        engine.sync_policy(model, step=0)
        engine.generate(prompts[:2], SamplingConfig(max_new_tokens=4, seed=None))  # the engine's own seeds
        assert torch.equal(torch.rand(3), expected)  # start-up and sampling leave the trainer's RNG alone
        sampling = SamplingConfig(
            temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=12, num_rollouts=2, seed=100
        )
        first = engine.generate(prompts[:3], sampling)
        assert [r.prompt_index for r in first] == [0, 0, 1, 1, 2, 2]  # prompt-major
        assert [r.completion_ids for r in engine.generate(prompts[:3], sampling)] == [
            r.completion_ids for r in first
        ]
        # request i samples with seed + i: prompt 1's copies are requests 2 and 3 of the first call,
        # requests 0 and 1 of a call on prompt 1 alone with seed 100 + 2
        alone = engine.generate(prompts[1:2], SamplingConfig(**{**sampling.__dict__, "seed": 102}))
        assert [r.completion_ids for r in alone] == [r.completion_ids for r in first[2:4]]
        assert first[0].completion_ids != first[1].completion_ids  # two rollouts of one prompt differ
    finally:
        engine.close()
    try:
        assert torch.distributed.is_initialized()
        total = torch.ones(2)
        torch.distributed.all_reduce(total)
        assert total.tolist() == [1.0, 1.0]  # world of 1: the sum is the tensor itself
    finally:
        torch.distributed.destroy_process_group()
