"""One vLLM engine per DDP rank: ``external_launcher`` on the trainer's group, the rank's own arguments.

Two gloo processes (this file run as a script, one per rank) each start :class:`VLLMEngine` on the
packaged tiny testbed, the way the DataModule does under DDP. vLLM's ``LLM`` is wrapped to record
what it was started with: the executor and the ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` it reads. On
CUDA the same ``LOCAL_RANK`` is the device vLLM takes; on CPU (here) it is only recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from egrsd_pl.rollout.vllm_compat import launcher_environment

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = ["What is 12 + 35?", "What is 7 * 8?"]


def test_launcher_environment_is_set_inside_and_restored_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with launcher_environment(rank=5, local_rank=1, world_size=8):
        assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("5", "1", "8")
    assert os.environ["LOCAL_RANK"] == "3"  # Lightning's value is back
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_a_moved_device_is_one_line_error() -> None:
    from egrsd_pl.rollout.vllm import check_device_kept

    check_device_kept(1, 1)
    check_device_kept(None, 0)  # CPU: nothing to check
    with pytest.raises(RuntimeError, match="from cuda:3 to cuda:0") as error:
        check_device_kept(3, 0)
    assert "\n" not in str(error.value)


@pytest.mark.vllm
@pytest.mark.slow
def test_two_ranks_start_one_engine_each_with_their_own_rank_and_seeds(tiny_model_dir: Path, tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)  # as under Lightning's launchers: LOCAL_RANK only
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(tiny_model_dir), str(tmp_path)],
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
        assert record["executor"] == "external_launcher"
        assert record["environment"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        assert record["environment_after"] == {"RANK": None, "LOCAL_RANK": str(rank), "WORLD_SIZE": None}
        assert record["engine_seed"] == 7919 * rank  # the DataModule's per-rank engine seed
        assert record["vllm_world"] == [2, rank]  # vLLM's world is the trainer's group
        assert record["tensor_parallel_size"] == 1  # each rank is its own replica
        assert record["trainer_group_after_close"] == 3.0  # all_reduce of rank + 1 over both ranks
    # A rank's rollouts are what its seed says: rank 1 sampling with rank 0's seed gets rank 0's tokens,
    # and the two seeds give different tokens.
    assert records[0]["own"] == records[1]["other"]
    assert records[1]["own"] == records[0]["other"]
    assert records[0]["own"] != records[1]["own"]


def run_rank(rank: int, model_dir: str, out_dir: str) -> None:
    """One DDP rank: gloo group, the student, a :class:`VLLMEngine` started, synced and sampled."""
    import vllm
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from egrsd_pl.rollout import SamplingConfig
    from egrsd_pl.rollout.vllm import VLLMEngine

    store = torch.distributed.FileStore(str(Path(out_dir) / "store"), 2)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2)
    record: dict = {}
    real_llm = vllm.LLM

    class RecordingLLM(real_llm):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
            record["executor"] = kwargs.get("distributed_executor_backend")
            record["engine_seed"] = kwargs["seed"]
            record["environment"] = {
                name: os.environ.get(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE")
            }
            super().__init__(**kwargs)

    vllm.LLM = RecordingLLM
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    engine = VLLMEngine(enforce_eager=True, max_model_len=256)
    try:
        engine.setup(model, tokenizer, model_path=model_dir, seed=7919 * rank)
        record["environment_after"] = {n: os.environ.get(n) for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        from vllm.distributed import parallel_state

        world = parallel_state.get_world_group()
        record["vllm_world"] = [world.world_size, world.rank_in_group]
        record["tensor_parallel_size"] = parallel_state.get_tp_group().world_size
        engine.sync_policy(model, step=0)
        sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12, num_rollouts=2)
        seeds = [1000, 2000]  # the rank's step seed, as the DataModule derives one per rank
        prompts = [tokenizer.encode(problem) for problem in PROBLEMS]

        def sample(seed: int) -> list[list[int]]:
            rollouts = engine.generate(prompts, dataclasses.replace(sampling, seed=seed))
            return [list(r.completion_ids) for r in rollouts]

        record["own"] = sample(seeds[rank])
        record["other"] = sample(seeds[1 - rank])
    finally:
        engine.close()
    total = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(total)
    record["trainer_group_after_close"] = float(total)
    torch.distributed.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), sys.argv[2], sys.argv[3])
