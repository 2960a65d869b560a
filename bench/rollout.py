"""Rollout throughput: HF ``generate`` vs vLLM on the same prompts, side by side in one run.

    python bench/rollout.py                                   # tiny testbed, CPU, float32
    python bench/rollout.py --sync-steps 5                    # also: merged vs adapter sync cost
    python bench/rollout.py --model qwen3-0.6b-random --device cuda --dtype bfloat16 --prompts 32 256

Both engines generate from the same LoRA-wrapped student (``--lora-rank``, as in training; HF runs
the PEFT model, vLLM the synced policy), the same prompt token ids and ``max_new_tokens``. Each
configuration is timed ``--repeats`` times after one warm-up call, alternating the engines within
each repeat; the table gives the fastest repeat (tokens/s, speed-up) and the median.
``--model`` is a local folder, ``testbed:tiny`` (the cached testbed), or a random-weight preset:
``tiny-random`` (testbed shape) or ``qwen3-0.6b-random`` (Qwen3-0.6B shape, 151,936-token synthetic
vocabulary, every completion runs to ``max_new_tokens``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from egrsd_pl.rollout import HFGenerateEngine, SamplingConfig  # noqa: E402

QWEN3_06B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=True,
)
QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@dataclass
class Row:
    engine: str
    mode: str
    prompts: int
    tokens: int
    seconds: float  # fastest repeat
    median_seconds: float
    tokens_per_s: float  # tokens / seconds
    speedup: float = 1.0


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="egrsd-bench-"))
    model_path, prompt_source = resolve_model(args.model, work, dtype)
    model, tokenizer = load_student(model_path, dtype, device, args.lora_rank)
    prompts = {n: make_prompts(tokenizer, prompt_source, n) for n in args.prompts}
    print(
        f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) on {device} "
        f"{args.dtype}, LoRA r {args.lora_rank}, max_new_tokens {args.max_new_tokens}; {machine()}",
        flush=True,
    )

    engines: dict[str, Any] = {}
    if "hf" in args.engines:
        engines["hf"] = HFGenerateEngine(batch_size=args.hf_batch_size)
        engines["hf"].setup(model, tokenizer, model_path=model_path, seed=0)
    if "vllm" in args.engines:
        from egrsd_pl.rollout.vllm import VLLMEngine

        started = time.perf_counter()
        engines["vllm"] = VLLMEngine(
            sync=args.sync,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_lora_rank=max(args.lora_rank, 8),
            enforce_eager=args.enforce_eager,
        )
        engines["vllm"].setup(model, tokenizer, model_path=model_path, seed=0)
        engines["vllm"].sync_policy(model, step=0)
        print(f"vLLM start-up + first sync: {time.perf_counter() - started:.1f} s", flush=True)
    rows = time_engines(engines, prompts, args)
    if "vllm" in engines:
        engines["vllm"].close()
    add_speedups(rows)
    print_table(rows)
    sync_rows = (
        compare_sync(model, tokenizer, model_path, prompts[min(prompts)], args) if args.sync_steps else []
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "device": device,
                    "machine": machine(),
                    "rows": [asdict(r) for r in rows],
                    "sync": sync_rows,
                },
                indent=2,
            )
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="testbed:tiny", help="folder, testbed:tiny, tiny-random or qwen3-0.6b-random"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--prompts", type=int, nargs="+", default=[32, 200], help="prompt counts (1 rollout each)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=192, help="the tiny config's L_max")
    parser.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    parser.add_argument(
        "--engines", nargs="*", default=["hf", "vllm"], choices=["hf", "vllm"], help="none: sync only"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--lora-rank", type=int, default=16, help="student LoRA rank (tiny config: 16); 0: none"
    )
    parser.add_argument(
        "--hf-batch-size", type=int, default=64, help="HFGenerateEngine batch_size (its default)"
    )
    parser.add_argument(
        "--sync", default="merged", choices=["merged", "adapter"], help="vLLM sync for the table"
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without compilation / CUDA graphs")
    parser.add_argument("--sync-steps", type=int, default=0, help="also time N syncs of each sync mode")
    parser.add_argument("--work-dir", default=None, help="where random-weight presets are written")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", default=None, help="write the rows here too")
    return parser.parse_args()


# ---------------------------------------------------------------------------- models and prompts


def resolve_model(name: str, work: Path, dtype: torch.dtype) -> tuple[str, str]:
    """(local folder, prompt source): ``"testbed"`` prompts are arithmetic problems, ``"random"`` random ids."""
    if name == "tiny-random":
        from egrsd_pl.testbed.build import build_testbed

        return str(build_testbed(work / "tiny-random", budget_s=0, progress=False)), "testbed"
    if name == "qwen3-0.6b-random":
        return str(build_random_qwen3(work / "qwen3-0.6b-random", dtype)), "random"
    if name.startswith("testbed:"):
        from egrsd_pl.testbed.build import resolve_model_path

        return resolve_model_path(name), "testbed"
    return name, "testbed" if Path(name, "testbed.json").is_file() else "random"


def build_random_qwen3(folder: Path, dtype: torch.dtype) -> Path:
    """A Qwen3-0.6B-shaped model with random weights and a word-level synthetic tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    if (folder / "config.json").is_file():
        return folder
    vocab = {f"w{i}": i for i in range(min(QWEN_SPECIALS.values()))}
    vocab.update(QWEN_SPECIALS)
    vocab.update({f"x{i}": i for i in range(max(QWEN_SPECIALS.values()) + 1, QWEN3_06B["vocab_size"])})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=QWEN3_06B["max_position_embeddings"],
    )
    config = Qwen3Config(
        **QWEN3_06B,
        eos_token_id=QWEN_SPECIALS["<|im_end|>"],
        pad_token_id=QWEN_SPECIALS["<|endoftext|>"],
        bos_token_id=None,
        dtype=str(dtype).split(".")[-1],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, config.pad_token_id], pad_token_id=config.pad_token_id
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_student(model_path: str, dtype: torch.dtype, device: str, lora_rank: int) -> tuple[Any, Any]:
    """The base model wrapped with a LoRA adapter ``default``, as the trainer's student is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa").to(
        device
    )
    rank = max(lora_rank, 1)
    model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    if lora_rank == 0:
        model = model.merge_and_unload()  # a zero adapter merged away: the plain base model
    model.eval()
    return model, tokenizer


def make_prompts(tokenizer: Any, source: str, count: int) -> list[list[int]]:
    if source == "testbed":
        from egrsd_pl.prompts import PromptBuilder
        from egrsd_pl.testbed.synthetic import synthetic_problems

        builder = PromptBuilder(tokenizer)
        return [
            builder.student_prompt_ids(p.problem) for p in synthetic_problems(count, seed=1, split="test")
        ]
    rng = random.Random(1)
    return [[rng.randrange(0, 150_000) for _ in range(rng.randint(48, 96))] for _ in range(count)]


# ---------------------------------------------------------------------------- timing


def time_engines(
    engines: dict[str, Any], prompts: dict[int, list[list[int]]], args: argparse.Namespace
) -> list[Row]:
    """Times every engine on every (mode, prompt count), alternating engines within each repeat so
    that load from other processes hits both alike; a row holds the fastest repeat (and the median)."""
    warm = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=0)
    for engine in engines.values():
        engine.generate(prompts[min(prompts)][:8], warm)
    rows = []
    for mode in args.modes:
        for count, batch in prompts.items():
            sampling = SamplingConfig(
                temperature=0.0 if mode == "greedy" else 1.1,
                top_p=0.95,
                top_k=20,
                max_new_tokens=args.max_new_tokens,
                num_rollouts=1,
                seed=1234,
            )
            seconds: dict[str, list[float]] = {name: [] for name in engines}
            tokens: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, engine in engines.items():
                    sync_device()
                    started = time.perf_counter()
                    rollouts = engine.generate(batch, sampling)
                    sync_device()
                    seconds[name].append(time.perf_counter() - started)
                    tokens[name] = sum(r.length for r in rollouts)
            for name in engines:
                best, median = min(seconds[name]), statistics.median(seconds[name])
                rows.append(
                    Row(
                        name,
                        mode,
                        count,
                        tokens[name],
                        round(best, 3),
                        round(median, 3),
                        round(tokens[name] / best, 1),
                    )
                )
                print(
                    f"  {name:5s} {mode:8s} {count:4d} prompts: {tokens[name]:6d} tokens, "
                    f"{' '.join(f'{s:.2f}' for s in seconds[name])} s",
                    flush=True,
                )
    return rows


def compare_sync(
    model: Any, tokenizer: Any, model_path: str, batch: list[list[int]], args: argparse.Namespace
) -> list[dict]:
    """Times ``sync_policy`` and the first ``generate`` after it, for each sync mode, over real AdamW steps."""
    from egrsd_pl.rollout.vllm import VLLMEngine

    lora = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    probe = torch.tensor([p[:16] for p in batch[:4]], device=lora[0].device)  # [4, 16]
    sampling = SamplingConfig(temperature=1.1, max_new_tokens=args.max_new_tokens, seed=7)
    results = []
    for sync in ("merged", "adapter"):
        started = time.perf_counter()
        engine = VLLMEngine(
            sync=sync,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_lora_rank=max(args.lora_rank, 8),
            enforce_eager=args.enforce_eager,
        )
        engine.setup(model, tokenizer, model_path=model_path, seed=0)
        startup = time.perf_counter() - started
        sync_s, first_s, again_s = [], [], []
        for step in range(args.sync_steps + 1):
            model.train()
            model(input_ids=probe, labels=probe).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            model.eval()
            started = time.perf_counter()
            engine.sync_policy(model, step)
            sync_device()
            synced = time.perf_counter()
            engine.generate(batch, sampling)
            sync_device()
            first = time.perf_counter()
            rollouts = engine.generate(batch, sampling)
            sync_device()
            if step > 0:  # step 0 warms up
                sync_s.append(synced - started)
                first_s.append(first - synced)
                again_s.append(time.perf_counter() - first)
        engine.close()
        tokens = sum(r.length for r in rollouts)
        results.append(
            dict(
                sync=sync,
                startup_s=round(startup, 2),
                sync_s=round(statistics.median(sync_s), 4),
                first_generate_s=round(statistics.median(first_s), 3),
                second_generate_s=round(statistics.median(again_s), 3),
                prompts=len(batch),
                last_tokens=tokens,
            )
        )
    print(f"\nsync per optimizer step, median of {args.sync_steps} steps ({len(batch)} prompts, sampled):")
    print("| sync | start-up s | sync s | first generate after sync s | second generate s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['sync']} | {r['startup_s']:.2f} | {r['sync_s']:.4f} | {r['first_generate_s']:.3f} "
            f"| {r['second_generate_s']:.3f} |"
        )
    return results


def add_speedups(rows: list[Row]) -> None:
    baseline = {(r.mode, r.prompts): r.tokens_per_s for r in rows if r.engine == "hf"}
    for row in rows:
        if (row.mode, row.prompts) in baseline:
            row.speedup = round(row.tokens_per_s / baseline[(row.mode, row.prompts)], 2)


def print_table(rows: list[Row]) -> None:
    print(
        "\n| engine | mode | prompts | tokens | seconds (best) | seconds (median) | tokens/s | speed-up vs HF |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: (r.mode, r.prompts, r.engine)):
        print(
            f"| {r.engine} | {r.mode} | {r.prompts} | {r.tokens} | {r.seconds:.2f} | {r.median_seconds:.2f} "
            f"| {r.tokens_per_s:.0f} | {r.speedup:.2f}x |"
        )


def sync_device() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"CPU x{os.cpu_count()}, load average {load:.1f}, torch threads {torch.get_num_threads()}"


if __name__ == "__main__":
    main()
