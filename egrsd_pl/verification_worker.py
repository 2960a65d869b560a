"""The math-verify worker process behind :class:`egrsd_pl.rewards.AnswerVerifier`.

math-verify's time limits use ``signal.alarm``, which only works in a process's main thread. Each
worker is a plain subprocess (DataLoader workers are daemonic and may not use ``multiprocessing``)
running :func:`serve`: math-verify in its own main thread, its timeouts active, under an address-space
limit, answering JSON lines ``[seq, gold, answer]`` with ``[seq, verdict, timed_out]`` on a pipe.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from collections import OrderedDict
from pathlib import Path

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


class MathVerifyWorker:
    """One math-verify subprocess speaking JSON lines: ``[seq, gold, answer]`` -> ``[seq, verdict]``."""

    def __init__(self, math_verify_timeout_s: int, memory_limit_bytes: int | None) -> None:
        code = (
            f"import sys; sys.path[:1] = [{_PACKAGE_ROOT!r}]; from egrsd_pl.verification_worker import serve; "
            f"serve({math_verify_timeout_s}, {memory_limit_bytes})"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._finalizer = weakref.finalize(self, _kill, self.process)
        self._buffer = b""
        self._seq = 0
        self.dead = False

    def fileno(self) -> int:
        assert self.process.stdout is not None
        return self.process.stdout.fileno()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.dead and b"\n" not in self._buffer:
            if not select.select([self.fileno()], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            self._read()
        if not self._buffer.startswith(b'"ready"\n'):
            self.stop()
            raise RuntimeError(
                f"the math-verify worker did not start within {timeout_s:.0f} s "
                f"(try: {sys.executable} -c 'import math_verify'; its error output is above)"
            )
        self._buffer = self._buffer[len(b'"ready"\n') :]

    def send(self, gold_text: str, answer_text: str) -> None:
        self._seq += 1
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps([self._seq, gold_text, answer_text]).encode() + b"\n")
            self.process.stdin.flush()
        except OSError:  # broken pipe: the worker died
            self.dead = True

    def receive(self) -> tuple[bool, bool] | None:
        """Reads what is available (call when readable); once a reply is complete, ``(verdict, timed_out)``."""
        self._read()
        if b"\n" not in self._buffer:
            return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            seq, verdict, timed_out = json.loads(line)
        except ValueError:
            seq, verdict, timed_out = None, False, False
        if seq != self._seq:  # garbled or out of step: treat as dead, it gets restarted
            self.dead = True
            return None
        return bool(verdict), bool(timed_out)

    def _read(self) -> None:
        chunk = os.read(self.fileno(), 65536)
        if chunk:
            self._buffer += chunk
        else:  # end of file: the worker exited
            self.dead = True

    def stop(self) -> None:
        self._finalizer()

    def abandon(self) -> None:
        """Forgets a worker inherited through ``fork`` without killing it (it is the parent's)."""
        self._finalizer.detach()
        _close_pipes(self.process)


def _kill(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()
    _close_pipes(process)


def _close_pipes(process: subprocess.Popen) -> None:
    for pipe in (process.stdin, process.stdout):
        try:
            if pipe is not None:
                pipe.close()
        except OSError:  # a request still buffered for a dead worker
            pass


class _TimeoutRecorder(logging.Handler):
    """Notes math-verify's "Timeout during ..." warnings (its only sign of a timeout) and drops all records."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = self.seen or record.getMessage().startswith("Timeout")


def serve(math_verify_timeout_s: int, memory_limit_bytes: int | None) -> None:
    """Worker main loop: math-verify in the main thread of its own process, its timeouts active."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; we exit when stdin closes
    if memory_limit_bytes is not None:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = memory_limit_bytes if hard == resource.RLIM_INFINITY else min(memory_limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints of any library go to stderr, not into the protocol
    sys.stdout = sys.stderr
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    timeouts = _TimeoutRecorder()  # math-verify logs its timeouts and returns "no match" / False
    math_verify_log = logging.getLogger("math_verify")
    math_verify_log.addHandler(timeouts)
    math_verify_log.propagate = False
    from math_verify import parse, verify

    gold_cache: OrderedDict[str, list] = OrderedDict()
    replies.write(b'"ready"\n')
    replies.flush()
    for line in sys.stdin.buffer:
        seq, gold_text, answer_text = json.loads(line)
        timeouts.seen = False
        try:
            if gold_text not in gold_cache:
                gold_cache[gold_text] = parse(gold_text, parsing_timeout=math_verify_timeout_s)
                if len(gold_cache) > 4096:
                    gold_cache.popitem(last=False)
            answer = parse(answer_text, parsing_timeout=math_verify_timeout_s)
            verdict = bool(verify(gold_cache[gold_text], answer, timeout_seconds=math_verify_timeout_s))
        except BaseException:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException
            verdict = False
        replies.write(json.dumps([seq, verdict, timeouts.seen]).encode() + b"\n")
        replies.flush()
