"""Rollouts from vLLM's own OpenAI-compatible server(s), on GPUs of their own (``egrsd serve``).

The trainer keeps its GPUs for the student and the teacher; one or more ``vllm serve`` processes
generate. Every optimizer step the policy reaches them as a LoRA adapter under a new name
(``policy-v{step}-{run}``, loaded with ``/v1/load_lora_adapter``), and every completion is asked for
by that name, so the response's ``model`` field says which policy produced it: a rollout of any
other version is refused, never trained on. Only the standard library speaks HTTP here
(``urllib.request``); see ``docs/server.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egrsd_pl.json_files import dumps
from egrsd_pl.rollout.base import Rollout, RolloutEngine, SamplingConfig, check_sequence_fits
from egrsd_pl.rollout.hf import stop_token_ids
from egrsd_pl.rollout.merge import POLICY_ADAPTER, merged_weights

log = logging.getLogger(__name__)

URL_FLAG = "--data.engine.init_args.url"
SYNC_FLAG = "--data.engine.init_args.sync"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
API_KEY_FLAG = "--data.engine.init_args.api_key"
SERVE_HINT = "egrsd serve --config CONFIG"
POLICY_NAME = re.compile(r"^policy-v(\d+)-([0-9a-f]+)$")
# Read from each weight file to fingerprint the model: its header (tensor names, shapes, offsets) and first weights.
FINGERPRINT_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class ServerError(RuntimeError):
    """A vLLM server is unreachable, misconfigured, or answered something this run cannot train on."""


@dataclass(frozen=True)
class ServedRollout(Rollout):
    """A :class:`Rollout` from a server: ``logprobs`` (the sampled tokens' log-probs as vLLM reports them,
    its default ``--logprobs-mode raw_logprobs``) and ``policy_version`` (the optimizer step whose policy
    produced it, parsed from the response's ``model``) are always set."""


def served_model_name(model_path: str) -> str:
    """The name ``egrsd serve`` serves a model folder under: ``{model_type}-{12 hex}``.

    The hex digits hash the folder's content, not its path (``config.json``, ``tokenizer.json``, and
    for each weight file its name, size and first MiB), so the same model copied to another node
    gets the same name and a server started on any other model is recognised and refused.
    """
    folder = Path(model_path)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    digest = hashlib.sha256(config.read_bytes())
    tokenizer = folder / "tokenizer.json"
    if tokenizer.is_file():
        digest.update(tokenizer.read_bytes())
    for file in sorted(folder.iterdir()):
        if file.name.endswith(WEIGHT_SUFFIXES) and file.is_file():
            with file.open("rb") as handle:
                digest.update(f"{file.name}:{file.stat().st_size}:".encode())
                digest.update(handle.read(FINGERPRINT_BYTES))
    model_type = str(json.loads(config.read_text()).get("model_type", "model"))
    return f"{re.sub(r'[^A-Za-z0-9_.]', '_', model_type)}-{digest.hexdigest()[:12]}"


def policy_version(name: str) -> int | None:
    """The step of a ``policy-v{step}-{run}`` name, ``None`` for any other name."""
    match = POLICY_NAME.match(name)
    return int(match.group(1)) if match else None


class _HTTPFailure(Exception):
    """One failed request: ``status`` is ``None`` when no HTTP answer came back."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class VLLMServerEngine(RolloutEngine):
    """Samples the current policy on one or more running vLLM servers (``egrsd serve``).

    Every completion is one ``/v1/completions`` request: the prompt as token ids, ``seed``, ``top_k``,
    ``stop_token_ids``, ``return_token_ids`` and ``logprobs=0`` (the sampled token's log-prob).
    Request ``i`` of a call goes to server ``i % len(url)``: a fixed split, so a step's rollouts do
    not depend on which server answers first.

    Decision: per-request seeds, exactly as :class:`~egrsd_pl.rollout.vllm.VLLMEngine`: with
    ``SamplingConfig.seed`` set, request ``i`` (prompt-major over ``num_rollouts`` copies) samples
    with ``seed + i``; with ``seed=None`` the base seed comes from the engine's own per-rank stream.
    Same rollouts as the colocated engine on the same weights, whatever the number of servers.

    Decision: one adapter name per step and run. At each :meth:`sync_policy` rank 0 saves the
    ``default`` adapter to ``adapter_dir/policy-v{step}-{run}``, every server loads it under that
    name, then unloads the previous one. A name is never reused: vLLM keys prefix-cache blocks by
    adapter name and path, and an in-place reload keeps blocks of the old weights.

    Decision (``sync="merged"``): rank 0 writes the merged weights (``W + scaling·B·A`` out of place, the base
    unchanged: :func:`~egrsd_pl.rollout.merge.merged_weights`) as a safetensors folder ``policy-v{step}-{run}``;
    every server reloads them in place through vLLM's own ``reload_weights`` (the worker method the colocated
    engine calls, here by ``POST /collective_rpc`` with ``weights_path``), drops its prefix cache
    (``/reset_prefix_cache``) and records the name as its weight version (``/update_weight_version``). The
    responses then name the base model, so a call's rollouts are refused unless every server still reports
    that weight version after answering (``/weight_info``). Those endpoints exist only in vLLM's development
    mode (``VLLM_SERVER_DEV_MODE=1``) and its ``--api-key`` does not guard them (it guards ``/v1`` paths):
    merged sync is for servers on this machine (127.0.0.1) only.

    The policy lives on the servers (a saved adapter), so :meth:`generate` may run in a background
    thread while the trainer updates the student (:attr:`generates_apart`, ``--data.async_steps 1``).

    Args:
        url: Base URL of a server (``http://127.0.0.1:8000``) or a list of them (requests are split).
        api_key: Sent as ``Authorization: Bearer``; the key the servers were started with (``--api-key``).
            ``None``: ``$VLLM_API_KEY`` if set (keeps the key out of the saved run config), else no key.
        sync: ``"adapter"`` (the policy as a LoRA adapter, loaded at runtime) or ``"merged"`` (merged weights
            reloaded in place; servers on 127.0.0.1 only, started with ``egrsd serve --sync merged``).
        adapter_dir: Parent folder of the adapter folders; the servers must read the same path
            (same machine or a shared file system). ``None``: the system temporary folder (servers on
            this machine only).
        model_name: The name the servers serve the base model under. ``None``: the name ``egrsd serve``
            gives this run's model (:func:`served_model_name`, from the folder's content), so a server on
            another model is refused.
        timeout_s: Seconds one HTTP request may take (a completion of ``max_new_tokens`` included).
        retries: Extra tries of a request that got no answer or a 5xx answer; then the run stops.
        retry_backoff_s: Wait before the first retry, doubled at each next one.
        concurrency: Requests in flight per server.
    """

    generates_apart = True

    def __init__(
        self,
        url: str | list[str] = "http://127.0.0.1:8000",
        api_key: str | None = None,
        sync: str = "adapter",
        adapter_dir: str | None = None,
        model_name: str | None = None,
        timeout_s: float = 600.0,
        retries: int = 3,
        retry_backoff_s: float = 1.0,
        concurrency: int = 64,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError(f"{URL_FLAG} needs at least one server URL")
        for address in urls:
            if not re.match(r"^https?://[^/\s]+/?$", address):
                raise ValueError(f"{URL_FLAG}: {address!r} is not a base URL like http://127.0.0.1:8000")
        if sync not in ("adapter", "merged"):
            raise ValueError(f"{SYNC_FLAG} must be 'adapter' or 'merged', got {sync!r}")
        if sync == "merged":
            for address in urls:
                host = re.sub(r"^https?://", "", address).rstrip("/").rsplit(":", 1)[0]
                if host not in LOOPBACK_HOSTS:
                    raise ValueError(
                        f"{SYNC_FLAG} merged drives vLLM's development endpoints (/collective_rpc), which its "
                        f"--api-key does not guard: servers on 127.0.0.1 only, not {address}; use sync: adapter"
                    )
        if timeout_s <= 0:
            raise ValueError(f"--data.engine.init_args.timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"--data.engine.init_args.retries must be >= 0, got {retries}")
        if retry_backoff_s < 0:
            raise ValueError(f"--data.engine.init_args.retry_backoff_s must be >= 0, got {retry_backoff_s}")
        if concurrency < 1:
            raise ValueError(f"--data.engine.init_args.concurrency must be >= 1, got {concurrency}")
        self.urls = [address.rstrip("/") for address in urls]
        self.sync = sync
        self.api_key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY") or None
        self.adapter_dir = adapter_dir
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.concurrency = concurrency
        self.synced_step: int | None = None
        self.sync_count = 0
        self.policy: str | None = None
        self._tokenizer: Any = None
        self._stop_ids: list[int] = []
        self._request_seeds: Any = None
        self._server_cap: int | None = None
        self._reserved = 0
        self._run = ""
        self._rank = 0
        self._adapter_root: Path | None = None
        self._served = ""
        self._base_path = ""

    # ------------------------------------------------------------------ lengths

    def reserve_length(self, tokens: int) -> None:
        self._reserved = max(self._reserved, tokens)
        if self._server_cap is not None and tokens > self._server_cap:
            raise ValueError(self._cap_error(tokens))

    def max_sequence_length(self) -> tuple[int, str] | None:
        return None if self._server_cap is None else (self._server_cap, "the server's --max-model-len")

    def _cap_error(self, tokens: int) -> str:
        return (
            f"the run needs sequences of {tokens:,} tokens but the vLLM server's --max-model-len is "
            f"{self._server_cap:,}; restart it with {SERVE_HINT} (sized from --data.max_length) or a larger "
            "--max-model-len"
        )

    # ------------------------------------------------------------------ lifecycle

    def setup(self, model: Any, tokenizer: Any, *, model_path: str, seed: int) -> None:
        """Checks every server before training: reachable, the right key, this run's model, LoRA loading.

        Raises:
            ServerError: One line naming the server and what is wrong with it.
        """
        import random

        import torch

        self.close()  # a second setup starts from a clean slate (no adapter left loaded, no folder left behind)
        self._tokenizer = tokenizer
        self._stop_ids = sorted(stop_token_ids(model, tokenizer))
        self._request_seeds = random.Random(seed)
        self.synced_step, self.policy = None, None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._rank = torch.distributed.get_rank() if distributed else 0
        run = [secrets.token_hex(4)]
        if distributed:  # every rank asks for the same adapter names
            torch.distributed.broadcast_object_list(run, src=0)
        self._run = run[0]
        expected = self.model_name or served_model_name(model_path)
        caps = [self._check_server(url, expected) for url in self.urls]
        self._served, self._base_path = expected, model_path
        self._server_cap = min(caps)
        if self._reserved > self._server_cap:
            raise ValueError(self._cap_error(self._reserved))
        if self.sync == "merged":
            for url in self.urls:
                self._check_development_mode(url)
            if self._rank == 0:
                self._adapter_root = Path(tempfile.mkdtemp(prefix="egrsd-server-", dir=self.adapter_dir))
            return
        if self._rank == 0:
            self._adapter_root = Path(tempfile.mkdtemp(prefix="egrsd-server-", dir=self.adapter_dir))
            probe = f"probe-{self._run}"  # a name outside the policy-v* series, loaded once and unloaded
            folder = self._save_adapter(model, probe)
            for url in self.urls:
                self._load_adapter(url, probe, folder)
                self._unload_adapter(url, probe)
            shutil.rmtree(self._adapter_root / probe, ignore_errors=True)

    def _check_server(self, url: str, expected: str) -> int:
        """Health, key and model of one server; returns its ``max_model_len``."""
        try:
            self._request(url, "/health", None, tries=1)
        except _HTTPFailure as failure:
            raise ServerError(
                f"no vLLM server answers at {url} ({failure.message}); start one with {SERVE_HINT} "
                f"--port {url.rsplit(':', 1)[-1]}"
            ) from None
        try:
            listing = self._request(url, "/v1/models", None, tries=1)
        except _HTTPFailure as failure:
            if failure.status == 401:
                given = "refused the API key" if self.api_key else "requires an API key and none was given"
                raise ServerError(
                    f"the vLLM server at {url} {given} (401 Unauthorized); set {API_KEY_FLAG} to the key it "
                    "was started with"
                ) from None
            raise ServerError(f"the vLLM server at {url} failed on /v1/models: {failure.message}") from None
        cards = [card for card in listing.get("data", []) if card.get("parent") is None]
        names = [str(card.get("id")) for card in cards]
        if expected not in names:
            raise ServerError(
                f"the vLLM server at {url} serves {', '.join(names) or 'no model'}, not this run's model "
                f"(served as {expected}); start it on this config's model with {SERVE_HINT}"
            )
        cap = next(card.get("max_model_len") for card in cards if card.get("id") == expected)
        if not isinstance(cap, int):
            raise ServerError(f"the vLLM server at {url} did not report max_model_len on /v1/models")
        return cap

    def _check_development_mode(self, url: str) -> None:
        try:
            self._request(url, "/reset_prefix_cache", {}, tries=1)
        except _HTTPFailure as failure:
            raise ServerError(
                f"the vLLM server at {url} has no development endpoints (/reset_prefix_cache: {failure.message}; "
                f"{SYNC_FLAG} merged needs VLLM_SERVER_DEV_MODE=1); start it with {SERVE_HINT} --sync merged"
            ) from None

    def close(self) -> None:
        """Unloads this run's adapter (merged: reloads the base weights) on the servers, best effort, and
        deletes the adapter folders. The servers keep running."""
        if self._rank == 0 and self.policy is not None and self.sync == "merged":
            for url in self.urls:
                try:
                    self._reload(url, self._base_path, "base", tries=1)
                except (_HTTPFailure, ServerError) as failure:
                    log.warning("could not reload the base weights on %s: %s", url, failure)
        elif self._rank == 0 and self.policy is not None:
            for url in self.urls:
                try:
                    self._request(url, "/v1/unload_lora_adapter", {"lora_name": self.policy}, tries=1)
                except _HTTPFailure as failure:
                    log.warning("could not unload %s from %s: %s", self.policy, url, failure.message)
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)
            self._adapter_root = None
        self.policy, self.synced_step = None, None

    # ------------------------------------------------------------------ policy sync

    def sync_policy(self, model: Any, step: int) -> None:
        """Makes every server serve ``model``'s adapter as ``policy-v{step}-{run}``, once per ``step``.

        Rank 0 saves and loads it, then unloads the previous version; under DDP the other ranks wait at
        a barrier and then ask for the same name.
        """
        if self._tokenizer is None:
            raise RuntimeError("VLLMServerEngine.sync_policy called before setup()")
        if step == self.synced_step:
            return
        import torch

        name = f"policy-v{step}-{self._run}"
        if self._rank == 0 and self.sync == "merged":
            folder = self._save_merged(model, name)
            for url in self.urls:
                self._reload(url, str(folder), name)
            if self.policy is not None:
                assert self._adapter_root is not None
                shutil.rmtree(self._adapter_root / self.policy, ignore_errors=True)
        elif self._rank == 0:
            folder = self._save_adapter(model, name)
            for url in self.urls:
                self._load_adapter(url, name, folder)
            if self.policy is not None:
                for url in self.urls:
                    self._unload_adapter(url, self.policy)
                assert self._adapter_root is not None
                shutil.rmtree(self._adapter_root / self.policy, ignore_errors=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.policy, self.synced_step = name, step
        self.sync_count += 1

    def _save_merged(self, model: Any, name: str) -> Path:
        """Writes the merged policy (plain HF names, one safetensors file) into ``adapter_dir/name``."""
        from safetensors.torch import save_file

        assert self._adapter_root is not None
        folder = self._adapter_root / name
        folder.mkdir()
        tensors, seen = {}, set()
        for weight_name, tensor in merged_weights(model, POLICY_ADAPTER):
            if weight_name in seen:
                continue
            seen.add(weight_name)
            tensors[weight_name] = tensor.detach().to("cpu").contiguous().clone()  # tied weights: own storage
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    def _reload(self, url: str, weights_path: str, version: str, *, tries: int | None = None) -> None:
        """vLLM's in-place ``reload_weights`` from ``weights_path``, then a fresh prefix cache and the version."""
        try:
            self._request(
                url,
                "/collective_rpc",
                {"method": "reload_weights", "kwargs": {"weights_path": weights_path}},
                tries=tries,
            )
        except _HTTPFailure as failure:
            if failure.status is None:
                raise self._lost(url, "/collective_rpc", failure) from None
            raise ServerError(
                f"the vLLM server at {url} did not reload the weights in {weights_path}: {failure.message}"
            ) from None
        for path, payload in (
            ("/reset_prefix_cache", {}),
            ("/update_weight_version", {"new_version": version}),
        ):
            try:
                self._request(url, path, payload, tries=tries)
            except _HTTPFailure as failure:
                raise self._lost(url, path, failure) from None

    def _save_adapter(self, model: Any, name: str) -> Path:
        assert self._adapter_root is not None
        folder = self._adapter_root / name
        model.save_pretrained(str(folder), selected_adapters=[POLICY_ADAPTER])
        saved = folder / POLICY_ADAPTER if (folder / POLICY_ADAPTER).is_dir() else folder
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            if not (saved / file).is_file():
                raise FileNotFoundError(f"adapter folder {saved} has no {file}; not handing it to the server")
        return saved

    def _load_adapter(self, url: str, name: str, folder: Path) -> None:
        try:
            self._request(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        except _HTTPFailure as failure:
            if failure.message == "HTTP 404: Not Found":  # FastAPI's answer for a route that is not there
                raise ServerError(
                    f"the vLLM server at {url} has no runtime LoRA loading (/v1/load_lora_adapter: "
                    f"{failure.status}; it needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=1); start it with {SERVE_HINT}"
                ) from None
            if "not enabled" in failure.message.lower() or "enable_lora" in failure.message.lower():
                raise ServerError(
                    f"the vLLM server at {url} was started without LoRA support ({failure.message}); start it "
                    f"with {SERVE_HINT} (--enable-lora --max-lora-rank)"
                ) from None
            if failure.status == 404:
                raise ServerError(
                    f"the vLLM server at {url} cannot read the adapter folder {folder} ({failure.message}); "
                    "--data.engine.init_args.adapter_dir must be a folder the servers see at the same path"
                ) from None
            if failure.status is None or failure.status >= 500:
                raise self._lost(url, "/v1/load_lora_adapter", failure) from None
            raise ServerError(
                f"the vLLM server at {url} did not load adapter {name}: {failure.message}"
            ) from None

    def _unload_adapter(self, url: str, name: str) -> None:
        try:
            self._request(url, "/v1/unload_lora_adapter", {"lora_name": name})
        except _HTTPFailure as failure:
            if failure.status is None or failure.status >= 500:
                raise self._lost(url, "/v1/unload_lora_adapter", failure) from None
            raise ServerError(
                f"the vLLM server at {url} did not unload adapter {name}: {failure.message}"
            ) from None

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Rollout]:
        if self._tokenizer is None:
            raise RuntimeError("VLLMServerEngine.generate called before setup()")
        if self.policy is None:
            raise RuntimeError("VLLMServerEngine.generate called before sync_policy(): no policy is served")
        if not prompt_ids:
            return []
        check_sequence_fits(
            max(len(ids) for ids in prompt_ids),
            sampling.max_new_tokens,
            model_context=None,
            engine_limit=self.max_sequence_length(),
            new_tokens_flag="max_new_tokens",
            prompt_name="the longest prompt of the call",
        )
        first_seed = self._request_seeds.randrange(2**31) if sampling.seed is None else sampling.seed
        policy = self.policy
        payloads = []
        for index, ids in enumerate(prompt_ids):
            for copy in range(sampling.num_rollouts):
                request = index * sampling.num_rollouts + copy
                payloads.append(
                    {
                        "model": policy if self.sync == "adapter" else self._served,
                        "prompt": [int(token) for token in ids],
                        "max_tokens": sampling.max_new_tokens,
                        "temperature": sampling.temperature,
                        "top_p": 1.0 if sampling.greedy else sampling.top_p,
                        "top_k": 0 if sampling.greedy or sampling.top_k <= 0 else sampling.top_k,
                        "seed": first_seed + request,
                        "stop_token_ids": self._stop_ids,
                        "return_token_ids": True,
                        "logprobs": 0,
                    }
                )
        urls = [self.urls[i % len(self.urls)] for i in range(len(payloads))]
        workers = min(len(payloads), self.concurrency * len(self.urls))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vllm-server") as pool:
            responses = list(pool.map(self._complete, urls, payloads))
        if (
            self.sync == "merged"
        ):  # the responses name the base model: the servers' weight version must still be ours
            for url in self.urls[: len(payloads)]:
                self._check_weight_version(url)
        rollouts: list[Rollout] = [
            self._to_rollout(i // sampling.num_rollouts, response, url, sampling.max_new_tokens)
            for i, (response, url) in enumerate(zip(responses, urls, strict=True))
        ]
        log.info("%d rollouts of policy version %d (%s)", len(rollouts), self.synced_step, policy)
        return rollouts

    def _check_weight_version(self, url: str) -> None:
        try:
            version = (self._request(url, "/weight_info", None) or {}).get("weight_version")
        except _HTTPFailure as failure:
            raise self._lost(url, "/weight_info", failure) from None
        if version != self.policy:
            raise ServerError(
                f"the vLLM server at {url} holds weights {version} instead of {self.policy} (restarted?): "
                "rollouts refused"
            )

    def _complete(self, url: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._request(url, "/v1/completions", payload)
        except _HTTPFailure as failure:
            if failure.status == 404 and payload["model"] in failure.message:
                raise ServerError(
                    f"the vLLM server at {url} no longer serves {payload['model']} (restarted?): {failure.message}"
                ) from None
            raise self._lost(url, "/v1/completions", failure) from None

    def _lost(self, url: str, path: str, failure: _HTTPFailure) -> ServerError:
        """The one line that stops a run whose server stopped answering (no answer or 5xx, after the retries)."""
        tries = self.retries + 1 if failure.status is None or failure.status >= 500 else 1
        return ServerError(
            f"the vLLM server at {url} failed {path} ({tries} {'try' if tries == 1 else 'tries'}): "
            f"{failure.message}; the run stops here and its last checkpoint is intact: restart the server "
            f"({SERVE_HINT}) and resume with --ckpt_path last"
        )

    def _to_rollout(
        self, prompt_index: int, response: dict[str, Any], url: str, max_new_tokens: int
    ) -> ServedRollout:
        """A completion in the HF engine's convention (stop token kept), refused unless it comes from the
        policy asked for, ends at a stop token, or has exactly ``max_new_tokens`` ids."""
        served = str(response.get("model"))
        expected = self.policy if self.sync == "adapter" else self._served
        if served != expected:
            raise ServerError(
                f"the vLLM server at {url} answered with {served} instead of {expected}: rollout refused"
            )
        choice = response["choices"][0]
        ids = [int(token) for token in choice.get("token_ids") or []]
        logprobs = [float(value) for value in (choice.get("logprobs") or {}).get("token_logprobs") or []]
        if len(logprobs) != len(ids):
            raise ServerError(
                f"the vLLM server at {url} returned {len(ids)} tokens but {len(logprobs)} logprobs"
            )
        cut = next((i + 1 for i, token in enumerate(ids) if token in self._stop_ids), None)
        finish = choice.get("finish_reason")
        if cut is None and (finish != "length" or len(ids) != max_new_tokens):
            raise ServerError(
                f"the vLLM server at {url} ended a completion after {len(ids)} tokens without a stop token "
                f"(finish_reason {finish!r}), before max_new_tokens {max_new_tokens}"
            )
        kept = ids[:cut] if cut is not None else ids
        version = policy_version(str(self.policy))
        assert version is not None  # a policy-v name
        return ServedRollout(
            prompt_index=prompt_index,
            completion_ids=tuple(kept),
            text=self._tokenizer.decode(kept, skip_special_tokens=True),
            truncated=cut is None,
            logprobs=tuple(logprobs[: len(kept)]),
            policy_version=version,
        )

    # ------------------------------------------------------------------ HTTP

    def _request(
        self, url: str, path: str, payload: dict[str, Any] | None, *, tries: int | None = None
    ) -> Any:
        """GET (``payload`` None) or POST JSON; retries no-answer and 5xx failures with doubling waits.

        Returns the decoded JSON, or the text of a non-JSON answer.

        Raises:
            _HTTPFailure: The last failure, after ``tries`` (default ``retries + 1``) attempts.
        """
        attempts = self.retries + 1 if tries is None else tries
        data = None if payload is None else dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        wait = self.retry_backoff_s
        for attempt in range(attempts):
            request = urllib.request.Request(url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    body = answer.read().decode()
                try:
                    return json.loads(body) if body else None
                except json.JSONDecodeError:
                    return body
            except urllib.error.HTTPError as error:
                failure = _HTTPFailure(error.code, f"HTTP {error.code}: {_error_text(error)}")
                if error.code < 500:
                    raise failure from None
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                failure = _HTTPFailure(None, f"{type(error).__name__}: {reason}")
            if attempt + 1 < attempts:
                log.warning("%s%s: %s; retrying in %.1f s", url, path, failure.message, wait)
                time.sleep(wait)
                wait *= 2
        raise failure


def _error_text(error: urllib.error.HTTPError) -> str:
    """The message of a vLLM / FastAPI error body on one line."""
    try:
        body = error.read().decode()
    except OSError:
        return str(error.reason)
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return " ".join(body.split())[:300] or str(error.reason)
    if isinstance(parsed, dict):
        inner = parsed.get("error", parsed.get("detail", parsed))
        if isinstance(inner, dict):
            inner = inner.get("message", inner)
        return " ".join(str(inner).split())[:300]
    return " ".join(str(parsed).split())[:300]
