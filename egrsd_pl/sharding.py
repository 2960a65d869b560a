"""Training past one GPU per replica: ``--trainer.strategy fsdp2`` (docs/fsdp.md).

PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the parameters, gathers them layer by
layer in forward and backward and reduce-scatters the gradients; Lightning's
:class:`~lightning.pytorch.strategies.ModelParallelStrategy` starts the processes, builds the device mesh and
calls the module's ``configure_model``, where :func:`shard_backbone` applies ``fully_shard``. This module only
wires them:

- :class:`FSDP2Strategy`: ``ModelParallelStrategy`` with every rank a data-parallel replica (its mesh is
  ``(world, 1)``), an HSDP option (``replicate_size`` copies of the weights, each sharded over
  ``world / replicate_size`` ranks), the mixed-precision policy, and checkpoints that gather only what the
  module keeps (the LoRA adapters) into one file written by rank 0 through the run's ``CheckpointIO``.
- :func:`shard_backbone`: rank 0's LoRA initialisation on every rank (:func:`broadcast_adapters`), then
  ``fully_shard`` on each decoder layer and on the decoder (the root: the vocabulary math calls the decoder
  directly), leaving the output head out, replicated.
- :func:`full_tensor`: a sharded tensor's full value (a collective: every rank calls it).

Checked on torch 2.13 and Lightning 2.6.6 (CPU, gloo; ``tests/test_fsdp2.py``).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

STRATEGY_NAME = "fsdp2"
OPTIMIZER_KEYS = (
    "optimizer_state_keys"  # how the checkpoint's optimizer state is keyed (written by FSDP2Strategy)
)
MODULE_PARAMETER_KEYS = "module_parameter_position"
ParamDtype = Literal["auto", "bfloat16", "float16", "float32"]


class FSDP2Strategy(ModelParallelStrategy):
    """``--trainer.strategy fsdp2``: FSDP2 (or HSDP) data parallelism over every process.

    Every rank is a data-parallel replica with its own problems (as under DDP); the weights are sharded over
    the ranks of a shard group. The module shards itself in ``configure_model`` (:func:`shard_backbone`).

    Decision (docs/fsdp.md#checkpoints): checkpoints are single files as under DDP (Lightning's
    ``save_distributed_checkpoint=False``): the LoRA tensors and their optimizer state are gathered (never the
    frozen base) and rank 0 writes them through the run's ``CheckpointIO`` (atomic, with the PEFT folder).

    Args:
        replicate_size: Number of full copies of the weights (HSDP); each copy is sharded over
            ``world_size / replicate_size`` ranks. ``auto``: the number of nodes (shard within a node,
            replicate across nodes); 1: shard over every rank (FSDP).
        param_dtype: Dtype the sharded parameters are gathered and computed in (``MixedPrecisionPolicy``);
            ``auto``: ``bfloat16`` on GPUs, the parameters' own dtype (``float32`` with ``--model.dtype
            float32``) elsewhere.
        reduce_dtype: Dtype of the gradient reduce-scatter (and of the HSDP all-reduce).
        reshard_after_forward: Free each layer's gathered weights after its forward (gathered again in
            backward): less memory, one more all-gather per layer.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU by default.
        timeout: Limit on one collective.
        load_from_rank0: Only global rank 0 reads the base from disk; the other ranks build it on the ``meta``
            device, shard it and receive their shards (and the LoRA initialisation) from rank 0 (torch's
            ``set_model_state_dict(broadcast_from_rank0=True)``): one copy of the base in host memory instead of
            one per rank. ``false``: every rank reads the whole base, then shards it.
    """

    strategy_name = STRATEGY_NAME

    def __init__(
        self,
        replicate_size: int | Literal["auto"] = "auto",
        param_dtype: ParamDtype = "auto",
        reduce_dtype: Literal["float32", "bfloat16"] = "float32",
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        load_from_rank0: bool = True,
    ) -> None:
        if replicate_size != "auto" and (not isinstance(replicate_size, int) or replicate_size < 1):
            raise ValueError(
                f"--fsdp2.replicate_size must be 'auto' or an integer >= 1, got {replicate_size!r}"
            )
        super().__init__(
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.replicate_size = replicate_size
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        self.load_from_rank0 = load_from_rank0
        self._shard_mesh: Any = None

    @property
    def receives_the_base(self) -> bool:
        """Whether this rank builds the base empty and receives it from rank 0 (``load_from_rank0``)."""
        return self.load_from_rank0 and self.world_size > 1 and self.global_rank != 0

    def setup_environment(self) -> None:
        # Lightning's mesh is (data_parallel, tensor_parallel): every rank is a data-parallel replica.
        world_size = self.num_nodes * self.num_processes
        self._data_parallel_size, self._tensor_parallel_size = world_size, 1
        replicate = self.num_nodes if self.replicate_size == "auto" else self.replicate_size
        if world_size % replicate:
            raise ValueError(
                f"--fsdp2.replicate_size {replicate} must divide the number of processes ({world_size})"
            )
        super().setup_environment()
        if replicate == 1:
            self._shard_mesh = self.device_mesh["data_parallel"]
        else:  # HSDP: dim 0 replicates, dim 1 shards (contiguous ranks, i.e. within a node)
            from torch.distributed.device_mesh import init_device_mesh

            self._shard_mesh = init_device_mesh(
                self.root_device.type,
                (replicate, world_size // replicate),
                mesh_dim_names=("replicate", "shard"),
            )

    @property
    def shard_mesh(self) -> Any:
        """The mesh ``fully_shard`` takes: 1-D (FSDP) or 2-D ``(replicate, shard)`` (HSDP)."""
        if self._shard_mesh is None:
            raise RuntimeError("FSDP2Strategy.shard_mesh is read before the processes were set up")
        return self._shard_mesh

    def mixed_precision_policy(self) -> Any:
        """The ``MixedPrecisionPolicy`` of ``fully_shard``: gather in ``param_dtype``, reduce in ``reduce_dtype``."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        name: str | None = self.param_dtype
        if name == "auto":
            name = "bfloat16" if self.root_device.type == "cuda" else None
        return MixedPrecisionPolicy(
            param_dtype=getattr(torch, name) if name else None,
            reduce_dtype=getattr(torch, self.reduce_dtype),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state the checkpoint keeps, full tensors on CPU (every rank calls it: collectives).

        Only the entries the module's ``saved_state(key)`` accepts (:meth:`EGRSDModule.saved_state`: the LoRA
        adapters) are gathered; Lightning's own method would gather the whole model, frozen base included.
        """
        assert self.model is not None
        keep = getattr(self.lightning_module, "saved_state", None)
        state = self.model.state_dict()  # sharded DTensors: no communication
        return {
            key: full_tensor(value).detach().cpu()
            for key, value in state.items()
            if keep is None or keep(key)
        }

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        checkpoint[OPTIMIZER_KEYS] = MODULE_PARAMETER_KEYS
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loading (adapters into the shards, optimizer state), with the checkpoint's ``state_dict``
        handed on to the hooks that read it (``TeacherUpdate`` checks the teacher adapter is there), as under
        DDP; Lightning's loader pops it. A checkpoint whose optimizer state another strategy keyed is refused
        (:func:`check_optimizer_keys`)."""
        path = Path(self.broadcast(checkpoint_path))
        saved = (
            torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
            if path.is_file()
            else None
        )
        module = self.lightning_module
        if saved is not None and module is not None and module.trainer.state.fn == TrainerFn.FITTING:
            check_optimizer_keys(saved, str(checkpoint_path))
        checkpoint = super().load_checkpoint(path, weights_only=weights_only)
        if "state_dict" not in checkpoint and saved is not None:
            checkpoint["state_dict"] = saved["state_dict"]
        return checkpoint

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name,
            cls,
            description="FSDP2 (fully_shard) over every process, HSDP across nodes; options under --fsdp2.*",
        )


def check_optimizer_keys(checkpoint: dict[str, Any], path: str) -> None:
    """Refuses to resume, under FSDP2, optimizer state keyed by another strategy (one line naming the flag).

    Lightning keys FSDP2's gathered optimizer state by position among all the module's parameters (the
    checkpoint records it under ``optimizer_state_keys``); DDP's plain ``optimizer.state_dict()`` by position
    among the optimizer's. Read the other way, the AdamW moments would land on other tensors.
    """
    if checkpoint.get("optimizer_states") and checkpoint.get(OPTIMIZER_KEYS) != MODULE_PARAMETER_KEYS:
        raise ValueError(
            f"--ckpt_path {path!r} was written under another strategy (ddp): its optimizer state is keyed for it; "
            "resume it with --trainer.strategy ddp (docs/fsdp.md#checkpoints)"
        )


def register_fsdp2_strategy() -> None:
    """Adds ``fsdp2`` to Lightning's ``StrategyRegistry`` (idempotent; the CLI calls it before parsing)."""
    if STRATEGY_NAME not in StrategyRegistry:
        FSDP2Strategy.register_strategies(StrategyRegistry)


def shard_backbone(
    policy: Any,
    mesh: Any,
    *,
    mp_policy: Any,
    reshard_after_forward: bool = True,
    from_rank0: bool = False,
) -> None:
    """``fully_shard`` on each decoder layer, then on the decoder, of a PEFT-wrapped causal LM.

    With ``from_rank0`` (every rank passes the same value) only rank 0 holds the weights (the others built the
    model on the ``meta`` device): every rank's shards, the replicated head and the buffers come from rank 0
    (:func:`load_from_rank0`). Otherwise every rank read the weights itself and only the LoRA initialisation
    is broadcast (:func:`broadcast_adapters`).

    The decoder is the FSDP root because it is the first module to run ``forward`` (the vocabulary math
    calls it directly; HF ``generate`` reaches it through the LM). The output head is left out.

    Decision (docs/fsdp.md#the-output-head): the head weight (tied to the input embedding in some models)
    stays replicated, never sharded: the chunked vocabulary math reads it outside ``forward``, and gathering it
    once per step would hold the same full ``[V, D]`` tensor on every rank during the loss (the same peak) and
    add an all-gather of it to every step.

    Raises:
        ValueError: A trainable parameter lies outside the decoder layers (e.g. LoRA on the head), where FSDP
            would not reduce its gradient.
    """
    from torch.distributed.fsdp import fully_shard

    full = policy.state_dict() if from_rank0 and torch.distributed.get_rank() == 0 else {}
    if not from_rank0:
        broadcast_adapters(policy, mesh.device_type)
    base = policy.get_base_model()
    decoder = base.get_decoder()
    head_weight = base.get_output_embeddings().weight
    options: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy}
    for layer in decoder.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(decoder, ignored_params={head_weight}, **options)
    outside = [
        name for name, p in policy.named_parameters() if p.requires_grad and not isinstance(p, DTensor)
    ]
    if outside:
        raise ValueError(
            f"--trainer.strategy fsdp2 shards the decoder layers, but {outside[0]!r} is trained outside them; "
            "keep --model.lora_target_modules inside the layers (the default projections)"
        )
    if from_rank0:
        load_from_rank0(policy, full, mesh.device_type)


def load_from_rank0(policy: Any, full: dict[str, Any], device_type: str) -> None:
    """Every rank's tensors from rank 0's full state dict ``full`` (``{}`` on the other ranks), after sharding.

    The other ranks' modules are materialised empty on the device (``to_empty``, then the model's own
    ``tie_weights``); torch's ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``
    broadcasts one tensor at a time and each rank keeps its shard (the whole tensor where it is not sharded: the head). Buffers that are not in
    the state dict (the rotary ``inv_freq``) are broadcast as they are.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = (
        torch.device(device_type, torch.cuda.current_device())
        if device_type == "cuda"
        else torch.device("cpu")
    )
    if torch.distributed.get_rank() == 0:
        policy.to(device)  # what fully_shard did not move (the head) joins the shards
    else:
        policy.to_empty(device=device)  # new parameter objects: tied weights come apart, and are tied again
        policy.get_base_model().tie_weights()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(policy, full, options=options)
    for buffer in policy.buffers():
        torch.distributed.broadcast(buffer, src=0)


def broadcast_adapters(policy: Any, device_type: str) -> None:
    """Gives every rank global rank 0's LoRA tensors (student and teacher), before sharding.

    DDP broadcasts rank 0's parameters when it wraps the model; ``fully_shard`` keeps each rank's own rows.
    The base weights come from disk, but PEFT initialises ``A`` from each process's random generator, which
    only a seed shared by every process (``seed_everything``) makes equal: without one, each rank's shard
    would come from a different initialisation, and HSDP replicas would hold different models.
    """
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else None
    for name, param in policy.named_parameters():
        if "lora_" in name:
            data = param.data if device is None else param.data.to(device)
            torch.distributed.broadcast(data, src=0)
            param.data = data


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (sharded by FSDP2)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(tensor: Tensor) -> Tensor:
    """The full value of a ``DTensor`` (an all-gather over its mesh: every rank must call it); a plain
    tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
