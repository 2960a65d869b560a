"""VLLMServerEngine and ``egrsd serve``: generation on vLLM's own server(s).

Without vLLM: a small stdlib HTTP fake on 127.0.0.1 that answers like vLLM 0.32's server (status codes
and error bodies read from ``vllm/entrypoints``) checks every failure message, the seed rule, the
request split, the sync protocol and that a run whose server dies stops with its checkpoint intact.
With vLLM (``vllm`` marker): one real server started by ``egrsd serve`` for the whole module.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from egrsd_pl.rollout import HFGenerateEngine, SamplingConfig
from egrsd_pl.rollout.server import (
    ServedRollout,
    ServerError,
    VLLMServerEngine,
    policy_version,
    served_model_name,
)

ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------- a fake vLLM server


class FakeServer:
    """Answers /health, /v1/models, /v1/{load,unload}_lora_adapter and /v1/completions like vLLM 0.32.

    Every completion is ``completion`` (token ids) with log-prob -0.5 each, or what ``completion(body)``
    returns as ``(token ids, log-probs)``; ``fail_after`` completions later every completion gets a 503.
    Records every request body.
    """

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        lora: str = "ok",
        completion: list[int] | Callable[[dict[str, Any]], tuple[list[int], list[float]]] | None = None,
        answer_model: str | None = None,
        fail_after: int | None = None,
    ) -> None:
        self.model, self.api_key, self.lora = model, api_key, lora
        self.completion = completion or [7, 8]
        self.answer_model, self.fail_after = answer_model, fail_after
        self.adapters: dict[str, str] = {}
        self.loaded: list[str] = []
        self.unloaded: list[str] = []
        self.completions: list[dict[str, Any]] = []
        self.failed = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def error(self, status: int, message: str, kind: str) -> None:
                self.reply(
                    status, {"error": {"message": message, "type": kind, "param": None, "code": status}}
                )

            def authorized(self) -> bool:
                if fake.api_key is None or self.headers.get("Authorization") == f"Bearer {fake.api_key}":
                    return True
                self.reply(401, {"error": "Unauthorized"})
                return False

            def do_GET(self) -> None:
                if self.path == "/health":
                    return self.reply(200, "")
                if not self.authorized():
                    return None
                if self.path == "/v1/models":
                    cards = [{"id": fake.model, "root": "/models/x", "parent": None, "max_model_len": 1024}]
                    cards += [{"id": n, "root": p, "parent": fake.model} for n, p in fake.adapters.items()]
                    return self.reply(200, {"object": "list", "data": cards})
                return self.reply(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                if not self.authorized():
                    return None
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("_lora_adapter") and fake.lora == "no-route":
                    return self.reply(404, {"detail": "Not Found"})
                if self.path == "/v1/load_lora_adapter":
                    if fake.lora == "not-enabled":
                        return self.error(500, "LoRA is not enabled. Use --enable-lora to enable LoRA.", "X")
                    name, path = body["lora_name"], body["lora_path"]
                    if not Path(path, "adapter_config.json").is_file():
                        message = f"Loading lora {name} failed: No adapter found for {path}"
                        return self.error(404, message, "NotFoundError")
                    with fake.lock:
                        if name in fake.adapters:
                            message = (
                                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                            )
                            return self.error(
                                400, message + "adapter in place, set 'load_inplace' to True.", "X"
                            )
                        fake.adapters[name] = path
                        fake.loaded.append(name)
                    return self.reply(200, f"Success: LoRA adapter '{name}' added successfully.")
                if self.path == "/v1/unload_lora_adapter":
                    with fake.lock:
                        fake.adapters.pop(body["lora_name"])
                        fake.unloaded.append(body["lora_name"])
                    return self.reply(200, "Success")
                if self.path == "/v1/completions":
                    with fake.lock:
                        if fake.fail_after is not None and len(fake.completions) >= fake.fail_after:
                            fake.failed += 1
                            return self.error(503, "engine is dead", "ServiceUnavailable")
                        fake.completions.append(body)
                    if callable(fake.completion):
                        ids, logprobs = fake.completion(body)
                    else:
                        ids = fake.completion[: body["max_tokens"]]
                        logprobs = [-0.5] * len(ids)
                    finish = "stop" if set(ids) & set(body["stop_token_ids"]) else "length"
                    choice = {
                        "index": 0,
                        "text": "",
                        "token_ids": ids,
                        "logprobs": {"token_logprobs": logprobs},
                        "finish_reason": finish,
                    }
                    return self.reply(200, {"model": fake.answer_model or body["model"], "choices": [choice]})
                return self.reply(404, {"detail": "Not Found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def lora_student(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, str, list[list[int]]]:
    """(PEFT student with a random, non-zero LoRA r 8 on the packaged testbed, tokenizer, model folder,
    4 student prompts). ``init_lora_weights=False``: the adapter changes the greedy completions."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from egrsd_pl.prompts import PromptBuilder
    from egrsd_pl.testbed import packaged_testbed_dir
    from egrsd_pl.testbed.synthetic import synthetic_problems

    packaged = packaged_testbed_dir()
    assert packaged is not None
    folder = str(packaged)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False
    )
    model = get_peft_model(base, config).eval()
    builder = PromptBuilder(tokenizer)
    prompts = [builder.student_prompt_ids(p.problem) for p in synthetic_problems(4, seed=3, split="test")]
    return model, tokenizer, folder, prompts


def engine_on(fake: FakeServer | list[FakeServer], **kwargs: Any) -> VLLMServerEngine:
    urls = fake.url if isinstance(fake, FakeServer) else [f.url for f in fake]
    return VLLMServerEngine(url=urls, retry_backoff_s=0.0, timeout_s=10.0, **kwargs)


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- names and flags


def test_served_name_follows_the_content_not_the_path(lora_student, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = lora_student[2]
    copy = Path(shutil.copytree(folder, tmp_path / "elsewhere"))
    name = served_model_name(folder)
    assert name.startswith("qwen3-") and len(name) == len("qwen3-") + 12
    assert served_model_name(str(copy)) == name  # same model on another path (another node): same name
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: beyond the first MiB only if the file is larger than 1 MiB
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size > 1 << 20
    assert served_model_name(str(copy)) == name  # documented limit: names, sizes and the first MiB
    data[2000] ^= 1  # a byte of the first MiB (past the safetensors header)
    weights.write_bytes(bytes(data))
    assert served_model_name(str(copy)) != name


def test_policy_names_parse() -> None:
    assert policy_version("policy-v12-0a1b2c3d") == 12
    assert policy_version("qwen3-0123456789ab") is None
    assert policy_version("policy-v3") is None


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        (dict(url=[]), "url"),
        (dict(url="127.0.0.1:8000"), "url"),
        (dict(sync="merged", url="http://10.1.2.3:8000"), "sync merged drives vLLM's development endpoints"),
        (dict(sync="lora"), "sync must be 'adapter' or 'merged'"),
        (dict(timeout_s=0), "timeout_s"),
        (dict(retries=-1), "retries"),
        (dict(concurrency=0), "concurrency"),
    ],
)
def test_constructor_names_the_bad_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag) as error:
        VLLMServerEngine(**kwargs)
    one_line(error)


# ---------------------------------------------------------------------------- failures before training


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_server_names_the_url_and_the_command(lora_student) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, folder, _ = lora_student
    port = free_port()
    engine = VLLMServerEngine(url=f"http://127.0.0.1:{port}", retry_backoff_s=0.0, timeout_s=5.0)
    with pytest.raises(ServerError) as error:
        engine.setup(model, tokenizer, model_path=folder, seed=0)
    message = one_line(error)
    assert message.startswith(f"no vLLM server answers at http://127.0.0.1:{port} (")
    assert message.endswith(f"start one with egrsd serve --config CONFIG --port {port}")


def test_server_on_another_model_is_refused(lora_student) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, folder, _ = lora_student
    with FakeServer("llama-0123456789ab") as fake, pytest.raises(ServerError) as error:
        engine_on(fake).setup(model, tokenizer, model_path=folder, seed=0)
    assert one_line(error) == (
        f"the vLLM server at {fake.url} serves llama-0123456789ab, not this run's model (served as "
        f"{served_model_name(folder)}); start it on this config's model with egrsd serve --config CONFIG"
    )


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ("no-route", "has no runtime LoRA loading (/v1/load_lora_adapter: 404; it needs "
         "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1); start it with egrsd serve --config CONFIG"),
        ("not-enabled", "was started without LoRA support (HTTP 500: LoRA is not enabled. Use --enable-lora to "
         "enable LoRA.); start it with egrsd serve --config CONFIG (--enable-lora --max-lora-rank)"),
    ],
)  # fmt: skip
def test_server_without_lora_is_refused_before_training(lora_student, lora: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, folder, _ = lora_student
    with FakeServer(served_model_name(folder), lora=lora) as fake, pytest.raises(ServerError) as error:
        engine_on(fake).setup(model, tokenizer, model_path=folder, seed=0)
    assert one_line(error) == f"the vLLM server at {fake.url} {expected}"


@pytest.mark.parametrize(
    ("key", "expected"),
    [("wrong", "refused the API key"), (None, "requires an API key and none was given")],
)
def test_wrong_or_missing_api_key_is_refused(
    lora_student, key: str | None, expected: str, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    model, tokenizer, folder, _ = lora_student
    with FakeServer(served_model_name(folder), api_key="right") as fake, pytest.raises(ServerError) as error:
        engine_on(fake, api_key=key).setup(model, tokenizer, model_path=folder, seed=0)
    assert one_line(error) == (
        f"the vLLM server at {fake.url} {expected} (401 Unauthorized); set --data.engine.init_args.api_key to "
        "the key it was started with"
    )


def test_the_right_key_passes_and_the_server_cap_bounds_requests(lora_student, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, folder, prompts = lora_student
    monkeypatch.setenv("VLLM_API_KEY", "right")  # the key from the environment, as the docs recommend
    with FakeServer(served_model_name(folder), api_key="right") as fake:
        engine = engine_on(fake)
        engine.reserve_length(1000)
        engine.setup(model, tokenizer, model_path=folder, seed=0)
        assert engine.max_sequence_length() == (1024, "the server's --max-model-len")
        with pytest.raises(ValueError, match="--max-model-len is 1,024"):
            engine.reserve_length(1025)
        # setup loaded and unloaded one probe adapter from a folder it then deleted
        assert fake.loaded == fake.unloaded and len(fake.loaded) == 1 and fake.loaded[0].startswith("probe-")
        engine.close()


# ---------------------------------------------------------------------------- sync, seeds, split


def test_sync_loads_a_new_name_each_step_and_unloads_the_previous(lora_student) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, folder, prompts = lora_student
    with FakeServer(served_model_name(folder)) as fake:
        engine = engine_on(fake)
        engine.setup(model, tokenizer, model_path=folder, seed=0)
        with pytest.raises(RuntimeError, match="sync_policy"):
            engine.generate(prompts, SamplingConfig(max_new_tokens=2))
        run = engine._run
        for step in (0, 1, 2):
            engine.sync_policy(model, step)
            engine.sync_policy(model, step)  # a second call in one step does nothing
            assert set(fake.adapters) == {f"policy-v{step}-{run}"}  # the previous one is gone
            rollouts = engine.generate(prompts, SamplingConfig(max_new_tokens=2))
            assert all(isinstance(r, ServedRollout) and r.policy_version == step for r in rollouts)
        assert fake.loaded[1:] == [f"policy-v{s}-{run}" for s in (0, 1, 2)]
        assert fake.unloaded[1:] == [f"policy-v{s}-{run}" for s in (0, 1)]
        root = engine._adapter_root
        assert root is not None and sorted(p.name for p in root.iterdir()) == [f"policy-v2-{run}"]
        engine.close()
        assert fake.adapters == {} and not root.exists()
        assert engine.sync_count == 3


def test_seed_rule_and_split_over_servers(lora_student) -> None:  # type: ignore[no-untyped-def]
    """Request i (prompt-major) samples with seed + i and goes to server i % 2."""
    model, tokenizer, folder, prompts = lora_student
    name = served_model_name(folder)
    eos = tokenizer.eos_token_id
    with (
        FakeServer(name, completion=[5, eos, 9]) as first,
        FakeServer(name, completion=[5, eos, 9]) as second,
    ):
        engine = engine_on([first, second])
        engine.setup(model, tokenizer, model_path=folder, seed=0)
        engine.sync_policy(model, 0)
        sampling = SamplingConfig(
            temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=4, num_rollouts=2, seed=100
        )
        rollouts = engine.generate(prompts[:3], sampling)
        assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2]
        assert [r.completion_ids for r in rollouts] == [(5, eos)] * 6  # cut after the stop token, kept
        assert [r.logprobs for r in rollouts] == [(-0.5, -0.5)] * 6
        assert not any(r.truncated for r in rollouts)
        received = [sorted((b["seed"], b["prompt"]) for b in fake.completions) for fake in (first, second)]
        assert received[0] == [(100, prompts[0]), (102, prompts[1]), (104, prompts[2])]  # requests 0, 2, 4
        assert received[1] == [(101, prompts[0]), (103, prompts[1]), (105, prompts[2])]  # requests 1, 3, 5
        body = next(b for b in first.completions if b["seed"] == 100)
        assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (1.1, 0.95, 20, 4)
        # <|endoftext|> (0) and <|im_end|> (2): the testbed's generation_config eos ids, as the other engines stop
        assert (
            body["stop_token_ids"] == [0, 2]
            and eos == 2
            and body["return_token_ids"]
            and body["logprobs"] == 0
        )
        greedy = engine.generate(prompts[:1], SamplingConfig(temperature=0.0, top_k=20, max_new_tokens=4))
        assert (first.completions[-1]["top_p"], first.completions[-1]["top_k"]) == (1.0, 0)
        assert len(greedy) == 1
        engine.close()


def test_short_completion_without_stop_and_wrong_version_are_refused(lora_student) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, folder, prompts = lora_student
    name = served_model_name(folder)
    with FakeServer(name, completion=[5, 6]) as fake:
        engine = engine_on(fake)
        engine.setup(model, tokenizer, model_path=folder, seed=0)
        engine.sync_policy(model, 0)
        truncated = engine.generate(prompts[:1], SamplingConfig(max_new_tokens=2))
        assert truncated[0].truncated and truncated[0].completion_ids == (5, 6)
        with pytest.raises(ServerError) as error:  # 2 tokens, no stop, but 3 were asked for
            engine.generate(prompts[:1], SamplingConfig(max_new_tokens=3))
        assert "ended a completion after 2 tokens without a stop token" in one_line(error)
        engine.close()
    with FakeServer(name, answer_model="policy-v0-00000000") as fake:
        engine = engine_on(fake)
        engine.setup(model, tokenizer, model_path=folder, seed=0)
        engine.sync_policy(model, 1)
        with pytest.raises(ServerError) as error:
            engine.generate(prompts[:1], SamplingConfig(max_new_tokens=2))
        assert one_line(error) == (
            f"the vLLM server at {fake.url} answered with policy-v0-00000000 instead of {engine.policy}: "
            "rollout refused"
        )
        engine.close()


def test_a_dying_server_gets_bounded_retries_then_a_clear_error(lora_student) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, folder, prompts = lora_student
    with FakeServer(served_model_name(folder), fail_after=0) as fake:
        engine = engine_on(fake, retries=2)
        engine.setup(model, tokenizer, model_path=folder, seed=0)
        engine.sync_policy(model, 0)
        with pytest.raises(ServerError) as error:
            engine.generate(prompts[:1], SamplingConfig(max_new_tokens=2))
        assert fake.failed == 3  # one try and two retries
        assert one_line(error) == (
            f"the vLLM server at {fake.url} failed /v1/completions (3 tries): HTTP 503: engine is dead; the run "
            "stops here and its last checkpoint is intact: restart the server (egrsd serve --config CONFIG) and "
            "resume with --ckpt_path last"
        )
        engine.close()


# ---------------------------------------------------------------------------- egrsd serve


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egrsd_pl.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_serve_refuses_a_public_address_without_a_key() -> None:
    result = run_cli("serve", "--config", "configs/tiny.yaml", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --host 0.0.0.0 exposes the server beyond this machine: give it an --api-key (the run sends it as "
        "--data.engine.init_args.api_key), or keep the default --host 127.0.0.1"
    )
    from egrsd_pl.serve import check_binding

    with pytest.raises(ValueError) as error:  # merged: even with a key
        check_binding("0.0.0.0", "k", "merged")
    assert one_line(error) == (
        "--host 0.0.0.0 with --sync merged would expose vLLM's development endpoints (/collective_rpc), which no "
        "--api-key guards: merged sync serves 127.0.0.1 only (use --sync adapter across machines)"
    )


def test_merged_sync_needs_the_development_endpoints(lora_student) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, folder, _ = lora_student
    with FakeServer(served_model_name(folder)) as fake, pytest.raises(ServerError) as error:
        engine_on(fake, sync="merged").setup(model, tokenizer, model_path=folder, seed=0)
    assert one_line(error) == (
        f"the vLLM server at {fake.url} has no development endpoints (/reset_prefix_cache: HTTP 404: Not Found; "
        "--data.engine.init_args.sync merged needs VLLM_SERVER_DEV_MODE=1); start it with egrsd serve --config "
        "CONFIG --sync merged"
    )


@pytest.mark.slow
def test_serve_dry_run_prints_the_flags_the_sync_needs() -> None:
    from egrsd_pl.testbed import packaged_testbed_dir

    result = run_cli(
        "serve", "--config", "configs/tiny.yaml", "--host", "0.0.0.0", "--api-key", "s3cret", "--port", "8123",
        "--dry-run", "--", "--enforce-eager",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = result.stdout.splitlines()[1].strip()
    assert "s3cret" not in result.stdout  # the key travels in the environment, never on a command line
    assert line.startswith('VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 VLLM_API_KEY="$VLLM_API_KEY" ')
    folder = str(packaged_testbed_dir())
    tail = (
        f"{folder} --host 0.0.0.0 --port 8123 --served-model-name {served_model_name(folder)} --dtype float32 "
        "--max-model-len 1024 --enable-lora --max-lora-rank 16 --max-loras 1 --generation-config vllm --seed 0"
    )
    assert tail in line and line.endswith("--enforce-eager")
    merged = run_cli("serve", "--config", "configs/tiny.yaml", "--sync", "merged", "--dry-run")
    assert merged.returncode == 0, merged.stderr
    line = merged.stdout.splitlines()[1].strip()
    assert line.startswith("VLLM_SERVER_DEV_MODE=1 ") and "--enable-lora" not in line


# ---------------------------------------------------------------------------- a run whose server dies


@pytest.mark.slow
def test_fit_stops_when_the_server_dies_and_keeps_the_last_checkpoint(lora_student, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Steps 0 and 1 get (one-token, stop-only) completions, then every completion fails: the run
    stops with the server's one line and last.ckpt is the one of step 2 (two finished steps)."""
    from egrsd_pl.cli import build_cli

    tokenizer, folder = lora_student[1], lora_student[2]
    with FakeServer(served_model_name(folder), completion=[tokenizer.eos_token_id], fail_after=8) as fake:
        args = [
            "fit", "--config", "configs/tiny.yaml", "--config", "configs/server.yaml",
            "--data.engine.init_args.url", fake.url, "--data.engine.init_args.retry_backoff_s", "0",
            "--data.engine.init_args.retries", "1", "--data.batch_size", "4", "--trainer.max_steps", "5",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--checkpoint.every_n_train_steps", "1",
            "--evaluation.at_end", "false", "--evaluation.every_n_steps", "0", "--summary.enabled", "false",
        ]  # fmt: skip
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            with pytest.raises(ServerError, match=r"failed /v1/completions \(2 tries\): HTTP 503"):
                build_cli(args)
        finally:
            os.chdir(cwd)
        assert len(fake.completions) == 8 and fake.failed == 8  # step 2's 4 requests, 2 tries each
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2


@pytest.mark.slow
def test_two_ddp_ranks_share_the_servers_and_only_rank_0_syncs(lora_student, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """2 CPU processes (gloo): one run tag, one load per step (by rank 0, else vLLM refuses a name loaded twice),
    and both ranks ask for the step's name after the barrier."""
    tokenizer, folder = lora_student[1], lora_student[2]
    with FakeServer(served_model_name(folder), completion=[tokenizer.eos_token_id]) as fake:
        command = [
            sys.executable, str(ROOT / "main.py"), "fit", "--config", str(ROOT / "configs/tiny.yaml"),
            "--config", str(ROOT / "configs/server.yaml"), "--data.engine.init_args.url", fake.url,
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
            "--data.batch_size", "2", "--trainer.logger", "false", "--checkpoint.every_n_train_steps", "0",
            "--evaluation.at_end", "false", "--summary.enabled", "false",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    run = fake.loaded[0].removeprefix("probe-")
    assert fake.loaded == [f"probe-{run}", f"policy-v0-{run}", f"policy-v1-{run}"]
    assert fake.unloaded == [
        f"probe-{run}",
        f"policy-v0-{run}",
        f"policy-v1-{run}",
    ]  # the last one at teardown
    asked = sorted(body["model"] for body in fake.completions)
    assert asked == [f"policy-v0-{run}"] * 4 + [f"policy-v1-{run}"] * 4  # 2 steps x 2 ranks x 2 problems


# ---------------------------------------------------------------------------- one step ahead (--data.async_steps 1)


def fit_through(url: str, root: Path, *extra: str) -> None:
    """A short ``fit`` of configs/tiny.yaml through the server at ``url``: batch 2, a checkpoint every step,
    metrics in a CSV file under ``root``."""
    from egrsd_pl.cli import build_cli

    args = [
        "fit", "--config", "configs/tiny.yaml", "--config", "configs/server.yaml",
        "--data.engine.init_args.url", url, "--data.engine.init_args.retry_backoff_s", "0",
        "--data.batch_size", "2", "--trainer.default_root_dir", str(root),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
        "--checkpoint.dirpath", str(root / "ckpt"), "--checkpoint.every_n_train_steps", "1",
        "--evaluation.at_end", "false", "--evaluation.every_n_steps", "0", "--summary.enabled", "false",
        "--torch_threads", "1", *extra,
    ]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        build_cli(args)
    finally:
        os.chdir(cwd)


def logged(root: Path, name: str) -> list[float]:
    """The values of one metric, step by step, from every CSV file under ``root`` (runs in order)."""
    import csv

    values = []
    for path in sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        values += [float(row[name]) for row in csv.DictReader(path.open()) if row.get(name)]
    return values


def lora_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {name: tensor for name, tensor in state.items() if "lora_" in name}


def versioned_completion(eos: int) -> Callable[[dict[str, Any]], tuple[list[int], list[float]]]:
    """Completion ``[10 + v, eos]`` with log-probs ``-1 - v / 10`` for policy version ``v``: a rollout of
    another version than the one the run asked for trains differently."""

    def complete(body: dict[str, Any]) -> tuple[list[int], list[float]]:
        version = policy_version(body["model"])
        assert version is not None
        return [10 + version, eos], [-1.0 - version / 10] * 2

    return complete


@pytest.mark.slow
def test_one_step_ahead_resumes_exactly_and_zero_steps_stays_on_policy(lora_student, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Against the fake (each policy version answers its own completion): 4 straight steps one step ahead
    equal 2 steps + --ckpt_path + 2 steps (the in-flight rollouts of step 2 come from the checkpoint, made by
    policy 1, not regenerated by policy 2); each step's rollouts are one version old; --data.async_steps 0
    asks each step's own version and logs staleness 0."""
    tokenizer, folder = lora_student[1], lora_student[2]
    complete = versioned_completion(tokenizer.eos_token_id)
    with FakeServer(served_model_name(folder), completion=complete) as fake:

        def versions_asked(since: int) -> list[int]:
            return [policy_version(b["model"]) or 0 for b in fake.completions[since:]]

        fit_through(fake.url, tmp_path / "straight", "--data.async_steps", "1", "--trainer.max_steps", "4")
        # step 0 samples its batch and requests the next from version 0; step t > 0 requests batch t + 1 from
        # version t (the last request is never trained on); 2 rollouts a batch
        assert versions_asked(0) == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
        assert logged(tmp_path / "straight", "async/staleness") == [0.0, 1.0, 1.0, 1.0]
        weights = logged(tmp_path / "straight", "async/is_weight_mean")
        assert len(weights) == 4 and all(0 < w <= 2.0 for w in weights)

        asked = len(fake.completions)
        fit_through(fake.url, tmp_path / "resumed", "--data.async_steps", "1", "--trainer.max_steps", "2")
        checkpoint = torch.load(tmp_path / "resumed/ckpt/last.ckpt", map_location="cpu", weights_only=False)
        ahead = checkpoint["RolloutDataModule"]["rollouts_ahead"]
        assert [r["policy_version"] for r in ahead["rollouts"]] == [1, 1]  # batch 3, requested by step 1
        fit_through(
            fake.url, tmp_path / "resumed", "--data.async_steps", "1", "--trainer.max_steps", "4",
            "--ckpt_path", str(tmp_path / "resumed/ckpt/last.ckpt"),
        )  # fmt: skip
        assert versions_asked(asked) == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]  # nothing asked twice after the resume
        assert logged(tmp_path / "resumed", "async/staleness") == [0.0, 1.0, 1.0, 1.0]
        straight = lora_tensors(tmp_path / "straight/ckpt/last.ckpt")
        resumed = lora_tensors(tmp_path / "resumed/ckpt/last.ckpt")
        assert straight.keys() == resumed.keys() and len(straight) > 0
        assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) <= 1e-6
        trained = [float(v.abs().max()) for k, v in straight.items() if "lora_B" in k]  # B starts at 0
        assert max(trained) > 0

        asked = len(fake.completions)
        fit_through(fake.url, tmp_path / "sync", "--data.async_steps", "0", "--trainer.max_steps", "2")
        assert versions_asked(asked) == [0, 0, 1, 1]
        assert logged(tmp_path / "sync", "async/staleness") == [0.0, 0.0]
        assert logged(tmp_path / "sync", "async/is_weight_mean") == []
        # the fake's log-prob of 10 + v under the student is far from -1 - v/10: logged, not corrected
        assert all(gap > 0.1 for gap in logged(tmp_path / "sync", "async/logprob_gap"))


@pytest.mark.slow
def test_one_step_ahead_refuses_gradient_accumulation(lora_student, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = lora_student[2]
    with FakeServer(served_model_name(folder)) as fake, pytest.raises(ValueError) as error:
        fit_through(
            fake.url, tmp_path, "--data.async_steps", "1", "--trainer.accumulate_grad_batches", "2",
            "--trainer.max_steps", "1",
        )  # fmt: skip
    assert one_line(error) == (
        "--data.async_steps 1 requests each optimizer step's batch one step ahead: it needs "
        "--trainer.accumulate_grad_batches 1, got 2"
    )
    assert fake.completions == []


# ---------------------------------------------------------------------------- a real vLLM server


class ServedVLLM:
    """One ``egrsd serve --config configs/tiny.yaml`` process on 127.0.0.1 (its own process group), which a
    test may kill and start again on the same port.

    It runs with ``VLLM_SERVER_DEV_MODE=1`` in its environment besides what ``egrsd serve`` sets for adapter
    sync, so that one server per module serves both sync modes (``egrsd serve --sync merged`` would set the
    same variable and leave LoRA off; its flags are checked by the dry-run test, and bench/server.py runs it)."""

    def __init__(self, log_file: Path) -> None:
        self.port, self.log_file = free_port(), log_file
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "egrsd_pl.cli", "serve", "--config", "configs/tiny.yaml", "--port",
                 str(self.port), "--", "--enforce-eager"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"},
            )  # fmt: skip
        deadline = time.monotonic() + 600
        while "vLLM server ready at" not in self.log_file.read_text():
            assert self.process.poll() is None, f"egrsd serve exited: {self.log_file.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the vLLM server was not ready after 600 s"
            time.sleep(1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signals the whole process group (``egrsd serve`` and vLLM's engine processes) and waits."""
        if self.process is None:
            return
        process, self.process = self.process, None
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # engine processes left behind by a SIGKILL
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedVLLM]:
    """One real server for the module; stopped at the end, whatever happened."""
    server = ServedVLLM(tmp_path_factory.mktemp("server") / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(vllm_server: ServedVLLM) -> str:
    return vllm_server.url


def served_adapters(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as answer:
        return [card["id"] for card in json.load(answer)["data"] if card.get("parent")]


def sampled_logprobs(model: Any, prompt: list[int], completion: tuple[int, ...]) -> list[float]:
    """log p(token | prefix) of each completion token under ``model`` (adapter active), by HF."""
    ids = torch.tensor([prompt + list(completion)])  # [1, T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [L, V]
    picked = torch.log_softmax(logits.double(), dim=-1).gather(1, torch.tensor(completion)[:, None])  # [L, 1]
    return picked[:, 0].tolist()


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_rollouts_equal_hf_after_each_adapter_sync(served: str, lora_student) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, folder, prompts = lora_student
    engine = VLLMServerEngine(url=served, timeout_s=120.0)
    hf = HFGenerateEngine()
    hf.setup(model, tokenizer, model_path=folder, seed=0)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine.setup(model, tokenizer, model_path=folder, seed=0)
    try:
        earlier: list[tuple[int, ...]] = []
        for step in (1, 2):
            if step == 2:  # one real optimizer step moves the adapter
                loss = -torch.log_softmax(model(input_ids=torch.tensor([prompts[0]])).logits[0, -1], -1)[7]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            engine.sync_policy(model, step)
            assert served_adapters(served) == [engine.policy]
            ours, reference = engine.generate(prompts, greedy), hf.generate(prompts, greedy)
            assert [r.completion_ids for r in ours] == [r.completion_ids for r in reference]
            assert [(r.text, r.truncated) for r in ours] == [(r.text, r.truncated) for r in reference]
            assert all(isinstance(r, ServedRollout) and r.policy_version == step for r in ours)
            for rollout in ours:  # vLLM's sampled-token log-probs against HF's, computed independently
                expected = sampled_logprobs(model, prompts[rollout.prompt_index], rollout.completion_ids)
                assert max(abs(a - b) for a, b in zip(rollout.logprobs, expected, strict=True)) < 1e-4
            if earlier:
                assert [r.completion_ids for r in ours] != earlier  # the new adapter is served, not the old
            earlier = [r.completion_ids for r in ours]
    finally:
        engine.close()
    assert served_adapters(served) == []


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_rollouts_equal_hf_after_each_merged_sync(served: str, lora_student) -> None:  # type: ignore[no-untyped-def]
    """sync merged: the merged weights reach the server through vLLM's reload_weights; after each of two syncs
    its greedy rollouts equal HF generate's on the PEFT student, the base (the teacher) is unchanged, a server
    whose weights are no longer the run's is refused, and close() puts the base weights back."""
    model, tokenizer, folder, prompts = lora_student
    url = served
    engine = VLLMServerEngine(url=url, sync="merged", timeout_s=120.0)
    hf = HFGenerateEngine()
    hf.setup(model, tokenizer, model_path=folder, seed=0)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine.setup(model, tokenizer, model_path=folder, seed=0)
    try:
        earlier: list[tuple[int, ...]] = []
        for step in (1, 2):
            if step == 2:  # one real optimizer step moves the adapter
                loss = -torch.log_softmax(model(input_ids=torch.tensor([prompts[0]])).logits[0, -1], -1)[7]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            engine.sync_policy(model, step)
            ours, reference = engine.generate(prompts, greedy), hf.generate(prompts, greedy)
            assert [r.completion_ids for r in ours] == [r.completion_ids for r in reference]
            assert all(r.policy_version == step for r in ours)
            for rollout in ours:
                expected = sampled_logprobs(model, prompts[rollout.prompt_index], rollout.completion_ids)
                assert rollout.logprobs is not None
                assert max(abs(a - b) for a, b in zip(rollout.logprobs, expected, strict=True)) < 1e-4
            if earlier:
                assert [r.completion_ids for r in ours] != earlier
            earlier = [r.completion_ids for r in ours]
        assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if "lora_" not in n)
        engine._request(url, "/update_weight_version", {"new_version": "someone-else"})
        with pytest.raises(ServerError) as error:
            engine.generate(prompts[:1], greedy)
        assert one_line(error) == (
            f"the vLLM server at {url} holds weights someone-else instead of {engine.policy} (restarted?): "
            "rollouts refused"
        )
    finally:
        engine.close()
    with urllib.request.urlopen(url + "/weight_info", timeout=10) as answer:
        assert json.load(answer)["weight_version"] == "base"
    with model.disable_adapter():  # the server serves the base again
        base = hf.generate(prompts[:1], greedy)
    body = {"model": served_model_name(folder), "prompt": prompts[0], "max_tokens": 24, "temperature": 0.0,
            "stop_token_ids": [0, 2], "return_token_ids": True}  # fmt: skip
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        ids = json.load(answer)["choices"][0]["token_ids"]
    assert tuple(ids) == base[0].completion_ids


@pytest.mark.vllm
@pytest.mark.slow
def test_seeded_rollouts_follow_the_request_index_and_equal_the_colocated_engine(
    served: str, lora_student
) -> None:  # type: ignore[no-untyped-def]
    """Request i samples with seed + i, as in the colocated VLLMEngine (adapter sync, same LoRA kernels): the
    same sampled token ids from the server and from an in-process engine on the same adapter."""
    from egrsd_pl.rollout.vllm import VLLMEngine

    model, tokenizer, folder, prompts = lora_student
    engine = VLLMServerEngine(url=served)
    sampling = SamplingConfig(
        temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=12, num_rollouts=2, seed=100
    )
    try:
        engine.setup(model, tokenizer, model_path=folder, seed=0)
        engine.sync_policy(model, 0)
        first = engine.generate(prompts[:3], sampling)
        alone = engine.generate(prompts[1:2], SamplingConfig(**{**sampling.__dict__, "seed": 102}))
    finally:
        engine.close()
    assert [r.completion_ids for r in alone] == [r.completion_ids for r in first[2:4]]
    assert first[0].completion_ids != first[1].completion_ids  # two rollouts of one prompt differ
    assert all(math.isfinite(v) and v <= 0 for r in first for v in r.logprobs)
    colocated = VLLMEngine(
        sync="adapter", dtype="float32", max_lora_rank=16, enforce_eager=True, max_model_len=1024
    )
    try:
        colocated.setup(model, tokenizer, model_path=folder, seed=0)
        colocated.sync_policy(model, 0)
        reference = colocated.generate(prompts[:3], sampling)
    finally:
        colocated.close()
    assert [r.completion_ids for r in first] == [r.completion_ids for r in reference]
    for served_rollout, colocated_rollout in zip(
        first, reference, strict=True
    ):  # both report vLLM's log-probs
        assert colocated_rollout.logprobs is not None
        assert (
            max(
                abs(a - b)
                for a, b in zip(served_rollout.logprobs or (), colocated_rollout.logprobs, strict=True)
            )
            < 1e-5
        )


@pytest.mark.vllm
@pytest.mark.slow
def test_three_fit_steps_through_the_server(
    served: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import csv
    import logging

    from egrsd_pl.cli import build_cli

    caplog.set_level(logging.INFO, logger="egrsd_pl.rollout.server")
    args = [
        "fit", "--config", "configs/tiny.yaml", "--config", "configs/server.yaml",
        "--data.engine.init_args.url", served, "--data.batch_size", "4", "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--evaluation.at_end", "false",
        "--evaluation.every_n_steps", "0", "--summary.enabled", "false",
    ]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        build_cli(args)
    finally:
        os.chdir(cwd)
    versions = [
        int(record.args[1])
        for record in caplog.records
        if record.msg.startswith("%d rollouts of policy version")
    ]
    assert versions == [0, 1, 2]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert served_adapters(served) == []  # the run unloaded its last adapter at teardown


@pytest.mark.vllm
@pytest.mark.slow
def test_one_step_ahead_through_a_real_server_resumes_exactly(served: str, tmp_path: Path) -> None:
    """4 steps with --data.async_steps 1 through the real server equal 2 steps + --ckpt_path + 2 steps (LoRA within
    1e-6); step 0 trains on its own policy's rollouts (the server's log-probs then equal the student's within
    1e-5, float32 on both sides), every later step on rollouts one version old."""
    fit_through(served, tmp_path / "straight", "--data.async_steps", "1", "--trainer.max_steps", "4")
    assert logged(tmp_path / "straight", "async/staleness") == [0.0, 1.0, 1.0, 1.0]
    gaps = logged(tmp_path / "straight", "async/logprob_gap")
    weights = logged(tmp_path / "straight", "async/is_weight_mean")
    assert len(gaps) == 4 and gaps[0] < 1e-5 and all(0 < gap < 1 for gap in gaps)
    assert len(weights) == 4 and weights[0] == pytest.approx(1.0, abs=1e-5)
    fit_through(served, tmp_path / "resumed", "--data.async_steps", "1", "--trainer.max_steps", "2")
    fit_through(
        served, tmp_path / "resumed", "--data.async_steps", "1", "--trainer.max_steps", "4",
        "--ckpt_path", str(tmp_path / "resumed/ckpt/last.ckpt"),
    )  # fmt: skip
    straight = lora_tensors(tmp_path / "straight/ckpt/last.ckpt")
    resumed = lora_tensors(tmp_path / "resumed/ckpt/last.ckpt")
    assert straight.keys() == resumed.keys() and len(straight) > 0
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) <= 1e-6
    assert served_adapters(served) == []


class KillServerAfter(L.Callback):
    """SIGKILLs the server after optimizer step ``step`` (before that step's checkpoint is written: Lightning
    runs checkpoint callbacks last)."""

    def __init__(self, server: ServedVLLM, step: int) -> None:
        self.server, self.step = server, step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.server.stop(signal.SIGKILL)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_server_killed_mid_run_stops_it_in_one_line_and_a_resume_after_a_restart_is_exact(
    vllm_server: ServedVLLM, tmp_path: Path
) -> None:
    """A straight 4-step run; then a 4-step run whose server is killed after step 2: it stops with one line,
    last.ckpt holds step 2; the server is started again, --ckpt_path last finishes the run, and its LoRA equals
    the straight run's (the same seeded rollouts from the restarted server). Runs last: it restarts the server."""
    from egrsd_pl.cli import build_cli

    fit_through(vllm_server.url, tmp_path / "straight", "--trainer.max_steps", "4")
    killed = tmp_path / "killed"
    args = [
        "--config", "configs/tiny.yaml", "--config", "configs/server.yaml",
        "--data.engine.init_args.url", vllm_server.url, "--data.engine.init_args.retries", "1",
        "--data.engine.init_args.retry_backoff_s", "0", "--data.batch_size", "2", "--trainer.max_steps", "4",
        "--trainer.default_root_dir", str(killed), "--trainer.logger", "false",
        "--checkpoint.dirpath", str(killed / "ckpt"), "--checkpoint.every_n_train_steps", "1",
        "--evaluation.at_end", "false", "--evaluation.every_n_steps", "0", "--summary.enabled", "false",
        "--torch_threads", "1",
    ]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cli = build_cli(args, run=False)
        cli.trainer.callbacks.append(KillServerAfter(vllm_server, step=2))
        with pytest.raises(ServerError) as error:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        os.chdir(cwd)
    message = one_line(error)
    assert message.startswith(
        f"the vLLM server at {vllm_server.url} failed /v1/load_lora_adapter (2 tries): "
    )
    assert message.endswith(
        "the run stops here and its last checkpoint is intact: restart the server (egrsd serve --config CONFIG) "
        "and resume with --ckpt_path last"
    )
    checkpoint = torch.load(killed / "ckpt/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    vllm_server.start()
    fit_through(vllm_server.url, killed, "--trainer.max_steps", "4", "--ckpt_path", "last")
    straight = lora_tensors(tmp_path / "straight/ckpt/last.ckpt")
    resumed = lora_tensors(killed / "ckpt/last.ckpt")
    assert torch.load(killed / "ckpt/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    assert straight.keys() == resumed.keys() and len(straight) > 0
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) <= 1e-6
    assert served_adapters(vllm_server.url) == []
