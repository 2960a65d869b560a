"""Benchmark: naive full-logits reductions vs the chunked ones of ``egrsd_pl.losses`` (not a test).

    python bench/losses.py                       # Qwen3 scale on CPU: V 151,936, 4 x 1,024 tokens, D 1,024
    python bench/losses.py --device cuda --hidden 2560 --repeats 3   # the first call includes CUDA start-up

"naive" is what the reference OPSD scripts do: full ``[B, T, V]`` logits, ``log_softmax`` in float32,
reductions over the vocabulary. "chunked" is ``teacher_token_stats`` / ``student_token_logprobs`` /
``token_kl``. Every (case, method) runs ``--repeats`` times in a fresh subprocess (naive, then chunked),
so one case's allocations cannot inflate another's peak. Times are wall-clock and process CPU time;
the table gives each repeat and the ratio of the medians.

Peak extra memory is measured over the inputs (hidden states, output projection, targets), which are
allocated before the measurement starts:
- CPU: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``), reset
  after the inputs are built by writing 5 to ``/proc/self/clear_refs``, minus the resident set at
  that moment. It counts every page the process touched (logits, autograd buffers, gradients).
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  allocated memory at that moment.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from egrsd_pl.losses import student_token_logprobs, teacher_token_stats, token_kl  # noqa: E402

Inputs = dict[str, torch.Tensor]
Chunks = dict[str, int]  # chunk_size, vocab_chunk_size


def naive_log_probs(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [B, T, V]


def naive_teacher_stats(inputs: Inputs, chunks: Chunks) -> None:
    with torch.no_grad():
        log_probs = naive_log_probs(inputs["hidden"], inputs["weight"])  # [B, T, V]
        log_probs.gather(-1, inputs["targets"][..., None])
        -(log_probs.exp() * log_probs).sum(-1)


def chunked_teacher_stats(inputs: Inputs, chunks: Chunks) -> None:
    teacher_token_stats(inputs["hidden"], inputs["weight"], inputs["targets"], **chunks)


def naive_student_logprobs(inputs: Inputs, chunks: Chunks) -> torch.Tensor:
    log_probs = naive_log_probs(inputs["hidden"], inputs["weight"])  # [B, T, V]
    return log_probs.gather(-1, inputs["targets"][..., None]).squeeze(-1)  # [B, T]


def chunked_student_logprobs(inputs: Inputs, chunks: Chunks) -> torch.Tensor:
    return student_token_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], **chunks)


def naive_kl(inputs: Inputs, chunks: Chunks) -> torch.Tensor:
    student = naive_log_probs(inputs["hidden"], inputs["weight"])  # [B, T, V]
    with torch.no_grad():
        teacher = naive_log_probs(inputs["teacher_hidden"], inputs["weight"])  # [B, T, V]
    return (teacher.exp() * (teacher - student)).sum(-1)  # [B, T]


def chunked_kl(inputs: Inputs, chunks: Chunks) -> torch.Tensor:
    return token_kl(inputs["hidden"], inputs["teacher_hidden"], inputs["weight"], **chunks)


def forward_backward(values_of: Callable[[Inputs, Chunks], torch.Tensor]) -> Callable[[Inputs, Chunks], None]:
    def run(inputs: Inputs, chunks: Chunks) -> None:
        inputs["hidden"].grad = None
        (values_of(inputs, chunks) * inputs["upstream"]).sum().backward()

    return run


def forward_with_grad(
    values_of: Callable[[Inputs, Chunks], torch.Tensor],
) -> Callable[[Inputs, Chunks], None]:
    def run(inputs: Inputs, chunks: Chunks) -> None:
        values_of(inputs, chunks)

    return run


CASES: dict[str, dict[str, Callable[[Inputs, Chunks], None]]] = {
    "teacher_token_stats fwd (no grad)": {"naive": naive_teacher_stats, "chunked": chunked_teacher_stats},
    "student_token_logprobs fwd+bwd": {
        "naive": forward_backward(naive_student_logprobs),
        "chunked": forward_backward(chunked_student_logprobs),
    },
    "token_kl fwd+bwd": {"naive": forward_backward(naive_kl), "chunked": forward_backward(chunked_kl)},
    "student_token_logprobs fwd (grad on)": {
        "naive": forward_with_grad(naive_student_logprobs),
        "chunked": forward_with_grad(chunked_student_logprobs),
    },
    "token_kl fwd (grad on)": {
        "naive": forward_with_grad(naive_kl),
        "chunked": forward_with_grad(chunked_kl),
    },
}
DEFAULT_CASES = list(CASES)[:3]


def make_inputs(args: argparse.Namespace) -> Inputs:
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.length, args.hidden)
    inputs = {
        "hidden": torch.randn(shape, generator=generator),
        "teacher_hidden": torch.randn(shape, generator=generator),
        # Logits of standard deviation ~2, like a trained LM head.
        "weight": torch.randn(args.vocab, args.hidden, generator=generator) * (2.0 / args.hidden**0.5),
        "targets": torch.randint(0, args.vocab, (args.batch, args.length), generator=generator),
        "upstream": torch.randn(args.batch, args.length, generator=generator),
    }
    inputs = {name: tensor.to(args.device) for name, tensor in inputs.items()}
    inputs["hidden"].requires_grad_()
    return inputs


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(args: argparse.Namespace) -> dict[str, object]:
    """Run one (case, method) ``args.repeats`` times; peak extra memory over all repeats."""
    inputs = make_inputs(args)
    run = CASES[args.case][args.method]
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        baseline = _status_kib("VmRSS") * 1024
    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run(inputs, {"chunk_size": args.chunk_size, "vocab_chunk_size": args.vocab_chunk_size})
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = _status_kib("VmHWM") * 1024 - baseline
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_extra_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batch", type=int, default=4, help="rollouts")
    parser.add_argument("--length", type=int, default=1024, help="completion tokens per rollout")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size D")
    parser.add_argument("--chunk-size", type=int, default=1024, help="positions processed at once")
    parser.add_argument(
        "--vocab-chunk-size", type=int, default=16384, help="vocabulary rows projected at once"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per (case, method)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=DEFAULT_CASES)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case is not None:
        torch.manual_seed(0)
        print(json.dumps(measure(args)))
        return

    shared = [
        f"--{name}={getattr(args, name.replace('-', '_'))}"
        for name in (
            "device",
            "vocab",
            "batch",
            "length",
            "hidden",
            "chunk-size",
            "vocab-chunk-size",
            "repeats",
        )
    ]
    print(f"load average at the start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"V {args.vocab:,}, {args.batch} x {args.length:,} tokens, D {args.hidden:,}, float32, "
        f"chunk_size {args.chunk_size}, vocab_chunk_size {args.vocab_chunk_size}, {args.repeats} repeats per cell"
    )
    rows = []
    for case in args.cases:
        results = {}
        for method in ("naive", "chunked"):
            command = [sys.executable, __file__, *shared, f"--case={case}", f"--method={method}"]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(output.strip().splitlines()[-1])
        rows.append((case, results))
        print(f"  done: {case}", file=sys.stderr)

    mib = 2**20
    print()
    print(
        "| case | time naive (s) | time chunked (s) | ratio | CPU time naive (s) | CPU time chunked (s) "
        "| ratio | peak extra naive (MiB) | peak extra chunked (MiB) | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, results in rows:
        naive, chunked = results["naive"], results["chunked"]
        cells = [case]
        for key in ("seconds", "cpu_seconds"):
            ratio = statistics.median(chunked[key]) / statistics.median(naive[key])
            cells += [" / ".join(f"{s:.1f}" for s in result[key]) for result in (naive, chunked)]
            cells.append(f"{ratio:.2f}x")
        cells += [f"{result['peak_extra_bytes'] / mib:,.0f}" for result in (naive, chunked)]
        cells.append(f"{100 * chunked['peak_extra_bytes'] / naive['peak_extra_bytes']:.1f} %")
        print("| " + " | ".join(cells) + " |")
    print(f"\nload average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
