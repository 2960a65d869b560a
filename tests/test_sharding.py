"""``--trainer.strategy fsdp2`` without launching processes: the CLI builds the strategy from ``--fsdp2.*``, the
sharding plan leaves the head whole, and what does not work under FSDP2 yet stops in one line naming the flag.

The 2-process runs (FSDP2 equals DDP, checkpoints, resume) are in ``tests/test_fsdp2.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch.distributed.tensor import DTensor

from egrsd_pl.callbacks.evaluation import PeriodicEvaluation
from egrsd_pl.cli import build_cli
from egrsd_pl.datamodule import RolloutDataModule
from egrsd_pl.rollout.base import RolloutEngine
from egrsd_pl.rollout.hf import HFGenerateEngine
from egrsd_pl.sharding import (
    FSDP2Strategy,
    broadcast_adapters,
    full_tensor,
    is_sharded,
    register_fsdp2_strategy,
    shard_backbone,
)


def test_fsdp2_is_registered_once_and_built_from_its_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    register_fsdp2_strategy()
    register_fsdp2_strategy()  # idempotent
    assert StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=fsdp2",
            "--fsdp2.replicate_size=2",
            "--fsdp2.param_dtype=bfloat16",
            "--fsdp2.reshard_after_forward=false",
            "--summary.enabled=false",
        ],
        run=False,
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FSDP2Strategy)
    assert (strategy.replicate_size, strategy.param_dtype, strategy.reshard_after_forward) == (
        2,
        "bfloat16",
        False,
    )
    assert strategy._save_distributed_checkpoint is False  # one file, written by rank 0
    strategy.parallel_devices = [torch.device("cpu")] * 2
    policy = strategy.mixed_precision_policy()
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_auto_param_dtype_is_the_parameters_own_on_cpu():
    strategy = FSDP2Strategy()
    strategy.parallel_devices = [torch.device("cpu")]
    policy = strategy.mixed_precision_policy()
    assert (policy.param_dtype, policy.reduce_dtype) == (None, torch.float32)
    assert strategy.replicate_size == "auto"  # HSDP across nodes, FSDP within one


@pytest.mark.parametrize("value", [0, -1, "two"])
def test_bad_replicate_size_names_the_flag(value: Any):
    with pytest.raises(ValueError, match=r"^--fsdp2\.replicate_size must be 'auto' or an integer >= 1"):
        FSDP2Strategy(replicate_size=value)


class _CopyingEngine(RolloutEngine):
    """An engine that would copy the weights out of the module (as vLLM's does): not for a sharded policy."""

    def setup(self, model: Any, tokenizer: Any, *, model_path: str, seed: int) -> None:
        pass

    def generate(self, prompt_ids: Any, sampling: Any) -> list[Any]:
        return []


def test_an_engine_that_needs_full_weights_is_refused_under_fsdp2_before_loading():
    assert HFGenerateEngine().supports_sharded_policy and not _CopyingEngine().supports_sharded_policy
    datamodule = RolloutDataModule(train_source="synthetic:4", engine=_CopyingEngine())
    datamodule.trainer = SimpleNamespace(strategy=FSDP2Strategy())  # type: ignore[assignment]
    with pytest.raises(
        ValueError, match=r"^--data\.engine _CopyingEngine does not work under --trainer\.strategy fsdp2"
    ):
        datamodule.setup("fit")


@pytest.mark.parametrize(
    ("every", "at_end", "stage", "engine", "refused"),
    [
        (
            5,
            False,
            "fit",
            HFGenerateEngine(),
            "avg@K evaluation with --data.engine HFGenerateEngine does not run",
        ),
        (
            0,
            True,
            "fit",
            HFGenerateEngine(),
            "avg@K evaluation with --data.engine HFGenerateEngine does not run",
        ),
        (0, False, "fit", HFGenerateEngine(), None),
        (5, True, "fit", _CopyingEngine(), None),  # an engine with its own weights generates alone
        (
            0,
            False,
            "validate",
            HFGenerateEngine(),
            "avg@K evaluation with --data.engine HFGenerateEngine does",
        ),
        (0, False, "validate", _CopyingEngine(), None),
    ],
)
def test_evaluation_under_fsdp2_is_refused_where_it_would_hang(every, at_end, stage, engine, refused):
    callback = PeriodicEvaluation(every_n_steps=every, at_end=at_end)
    trainer: Any = SimpleNamespace(strategy=FSDP2Strategy(), datamodule=SimpleNamespace(engine=engine))
    module: Any = SimpleNamespace()
    if refused:
        with pytest.raises(ValueError, match="^" + refused):
            callback.setup(trainer, module, stage)
    else:
        callback.setup(trainer, module, stage)


@pytest.fixture
def one_process_group(tmp_path: Path):
    """A world of one gloo process (conftest destroys it after the test)."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1,))


def _policy(tiny_model_dir: Path, targets: list[str]) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))


def test_sharding_plan_shards_the_layers_and_leaves_the_head_whole(tiny_model_dir: Path, one_process_group):
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    policy = _policy(tiny_model_dir, ["q_proj", "v_proj"])
    base = policy.get_base_model()
    head = base.get_output_embeddings().weight
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = policy(input_ids=ids).logits.detach()
    base_norm = base.get_decoder().norm.weight.detach().clone()
    shard_backbone(policy, one_process_group, mp_policy=MixedPrecisionPolicy())
    decoder = base.get_decoder()
    assert isinstance(decoder, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in decoder.layers)
    assert is_sharded(policy) and isinstance(
        decoder.layers[0].self_attn.q_proj.lora_A.default.weight, DTensor
    )
    # The head the vocabulary math reads is the same full tensor as before (here tied to the embedding).
    assert base.get_output_embeddings().weight is head and not isinstance(head, DTensor)
    assert base.config.tie_word_embeddings and decoder.embed_tokens.weight is head
    norm = decoder.norm.weight  # in the root unit: sharded until the first forward gathers it
    assert isinstance(norm, DTensor) and torch.equal(full_tensor(norm), base_norm)
    assert torch.equal(policy(input_ids=ids).logits.detach(), before)


def test_a_trained_tensor_outside_the_layers_is_refused(tiny_model_dir: Path, one_process_group):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = _policy(tiny_model_dir, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"lm_head.*keep --model\.lora_target_modules inside the layers"):
        shard_backbone(policy, one_process_group, mp_policy=MixedPrecisionPolicy())


def _merge_under_fsdp2(rank: int, model_dir: str, store: str) -> None:
    """One of 2 gloo processes: merged weights of the sharded policy equal the unsharded ones bit for bit, and
    the ``hard_copy`` teacher update copies the sharded student adapter exactly."""
    from peft.tuners.lora import LoraLayer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from egrsd_pl.rollout.merge import merged_weights
    from egrsd_pl.teacher import Teacher, lora_parameters

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # a different LoRA initialisation (A) on each rank: rank 0's must win
        policy = _policy(Path(model_dir), ["q_proj", "v_proj", "down_proj"])
        teacher = Teacher("hard_copy")
        teacher.attach(policy, policy.peft_config["default"])
        own_factor = policy.get_base_model().model.layers[1].self_attn.v_proj.lora_A["default"].weight.clone()
        broadcast_adapters(policy, "cpu")
        generator = torch.Generator().manual_seed(1)
        for module in policy.modules():
            if isinstance(module, LoraLayer):  # a trained-looking adapter (B starts at 0)
                module.lora_B["default"].weight.data.normal_(generator=generator)
        # Reference, unsharded: PEFT's own delta (get_delta_weight) on the base weight, other tensors as they are.
        base = policy.get_base_model()
        reference = {
            name: tensor.clone() for name, tensor in base.state_dict().items() if "lora_" not in name
        }
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                reference.pop(name + ".base_layer.weight")
                reference[name + ".weight"] = module.base_layer.weight + module.get_delta_weight("default")
        frozen = {n: p.detach().clone() for n, p in policy.named_parameters()}
        shard_backbone(policy, init_device_mesh("cpu", (2,)), mp_policy=MixedPrecisionPolicy())
        assert isinstance(base.model.layers[0].mlp.down_proj.base_layer.weight, DTensor)
        merged = dict(merged_weights(policy))
        assert merged.keys() == reference.keys()
        different = [name for name in reference if not torch.equal(merged[name], reference[name])]
        assert not different, different[:3]
        # The module (base = the frozen teacher, and the adapters) is untouched by the sync.
        after = {n: full_tensor(p.detach()) for n, p in policy.named_parameters()}
        assert all(torch.equal(after[n], frozen[n]) for n in frozen)
        # shard_backbone broadcast rank 0's adapters again: rank 1's own initialisation is gone.
        kept = after["base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"]
        assert torch.equal(kept, own_factor) == (rank == 0)
        # hard_copy on the shards: the teacher adapter becomes the (trained-looking) student, tensor for tensor.
        student = {k: full_tensor(v.detach()) for k, v in lora_parameters(policy, "default").items()}
        assert not all(
            torch.equal(full_tensor(v.detach()), student[k])
            for k, v in lora_parameters(policy, "teacher").items()
        )
        teacher.update(0.0, step=1)
        copied = {k: full_tensor(v.detach()) for k, v in lora_parameters(policy, "teacher").items()}
        assert copied.keys() == student.keys() and all(torch.equal(copied[k], student[k]) for k in student)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_merged_weights_of_a_sharded_policy_equal_the_unsharded_ones(tiny_model_dir: Path, tmp_path: Path):
    import torch.multiprocessing as mp

    mp.spawn(_merge_under_fsdp2, args=(str(tiny_model_dir), str(tmp_path / "store")), nprocs=2)


def _load_from_rank0(rank: int, model_dir: str, store: str) -> None:
    """One of 2 gloo processes: rank 1 never reads the weights, yet ends with rank 0's model, shard by shard."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoModelForCausalLM

    from egrsd_pl.backbone import load_backbone

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        read = AutoModelForCausalLM.from_pretrained
        if rank == 1:  # the weights must not be read on this rank

            def refuse(*args: Any, **kwargs: Any) -> Any:
                raise AssertionError("rank 1 read the weights")

            AutoModelForCausalLM.from_pretrained = refuse  # type: ignore[method-assign]
        _, base = load_backbone(
            "tiny", model_dir, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False,
            empty=rank == 1,
        )  # fmt: skip
        AutoModelForCausalLM.from_pretrained = read  # type: ignore[method-assign]
        assert base.generation_config.eos_token_id is not None
        torch.manual_seed(rank)  # a different LoRA initialisation on each rank: rank 0's must win
        policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        assert all(p.is_meta for p in policy.parameters()) == (rank == 1)
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        before = [policy(input_ids=ids).logits.detach() if rank == 0 else None]
        expected = [{n: p.detach().clone() for n, p in policy.named_parameters()} if rank == 0 else None]
        expected[0] = expected[0] and {**expected[0], **{n: b.clone() for n, b in policy.named_buffers()}}
        shard_backbone(
            policy, init_device_mesh("cpu", (2,)), mp_policy=MixedPrecisionPolicy(), from_rank0=True
        )
        torch.distributed.broadcast_object_list(before, src=0)
        torch.distributed.broadcast_object_list(expected, src=0)
        assert not any(t.is_meta for t in [*policy.parameters(), *policy.buffers()])
        assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # tied, as on disk
        values = {n: full_tensor(p.detach()) for n, p in policy.named_parameters()}
        values.update({n: b for n, b in policy.named_buffers()})
        assert values.keys() == expected[0].keys(), sorted(values.keys() ^ expected[0].keys())[:6]
        different = [n for n in values if not torch.equal(values[n], expected[0][n])]
        assert not different, different[:3]
        assert any("inv_freq" in n for n in values)  # a buffer that is not in the state dict
        assert torch.equal(policy(input_ids=ids).logits.detach(), before[0])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_load_from_rank0_gives_every_rank_rank0s_model_without_reading_it(
    tiny_model_dir: Path, tmp_path: Path
):
    import torch.multiprocessing as mp

    mp.spawn(_load_from_rank0, args=(str(tiny_model_dir), str(tmp_path / "store")), nprocs=2)


def test_resuming_optimizer_state_keyed_by_another_strategy_is_refused():
    from egrsd_pl.sharding import MODULE_PARAMETER_KEYS, OPTIMIZER_KEYS, check_optimizer_keys

    ddp = {"state_dict": {}, "optimizer_states": [{"state": {0: {}}, "param_groups": []}]}
    with pytest.raises(
        ValueError, match=r"^--ckpt_path 'last\.ckpt' was written under another strategy \(ddp\)"
    ):
        check_optimizer_keys(ddp, "last.ckpt")
    check_optimizer_keys(
        {**ddp, OPTIMIZER_KEYS: MODULE_PARAMETER_KEYS}, "last.ckpt"
    )  # written by FSDP2Strategy
    check_optimizer_keys({"state_dict": {}}, "weights.ckpt")  # no optimizer state: nothing to mis-key
