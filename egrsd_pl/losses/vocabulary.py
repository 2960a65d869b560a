"""Per-token quantities over the full vocabulary, never materialising ``[B, T, V]`` logits.

With Qwen3's 151,936-token vocabulary, float32 logits for 4 rollouts x 1,024 completion tokens take
2.5 GB per copy, and a naive ``log_softmax`` (plus its backward) holds several copies. Here the
flattened positions are processed ``chunk_size`` at a time, and within a chunk the output projection
(``lm_head.weight``) is applied ``vocab_chunk_size`` rows at a time: each ``[chunk, vocab block]``
block of logits is reduced in float32 into running statistics (an online log-sum-exp: running max,
rescaled sums) and discarded. Extra memory is ``O(chunk_size x vocab_chunk_size)``; with
``vocab_chunk_size >= V`` this is plain "project a chunk, log-softmax, reduce".

Inputs are the hidden states at the positions that *predict* the completion tokens, so prompt
positions are never projected; with the optional ``mask`` padding positions are skipped too.

Gradients (student side): each per-position value depends on its own hidden state only, so its
gradient w.r.t. that hidden state is a ``[D]`` row independent of the upstream gradient. When the
output projection is frozen (LoRA) that row is accumulated in the same pass as the value
(``E_p[W_v]``, or ``E_p[d_v W_v]`` for the reverse KL, online like the normaliser) and backward only
scales it: no logits are stored or recomputed. When ``weight.requires_grad`` the logits are recomputed block by block in backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from egrsd_pl.losses._checks import check_bool_mask, check_chunk_size, check_ndim, check_shape


def _without_autocast(device: torch.device) -> torch.autocast:
    """Autocast off for the vocabulary math, so that its float32 sums stay float32 under bf16-mixed.

    Autocast runs ``einsum``/``matmul`` in bfloat16 even on float32 operands (on CPU too); inside, the
    projection runs in the inputs' dtype and every reduction in float32, as written.
    """
    return torch.autocast(device_type=device.type, enabled=False)


def _chunks(size: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, size, chunk_size):
        yield slice(start, min(start + chunk_size, size))


def _project(hidden: Tensor, weight_block: Tensor) -> Tensor:
    """Logits of a block in float32: ``hidden @ weight_block.T`` in the inputs' dtype, then upcast."""
    return (hidden @ weight_block.T).float()  # [C, Vb]


def _buffer_view(buffer: Tensor, rows: int, columns: int) -> Tensor:
    """A contiguous ``[rows, columns]`` view of the front of a flat buffer."""
    return buffer[: rows * columns].view(rows, columns)


def _logit_blocks(hidden: Tensor, weight: Tensor, vocab_chunk_size: int) -> Iterator[tuple[slice, Tensor]]:
    """``(block, logits [C, Vb] float32)`` for consecutive vocabulary blocks of ``weight``.

    Every block is written into the same buffer (a fresh ``[C, Vb]`` allocation per block costs page
    faults comparable to the reductions): use, or overwrite, the logits before the next step.
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    buffer = torch.empty(rows * min(vocab_chunk_size, vocab), dtype=torch.float32, device=hidden.device)
    for block in _chunks(vocab, vocab_chunk_size):
        logits = _buffer_view(buffer, rows, block.stop - block.start)  # [C, Vb]
        if hidden.dtype == weight.dtype == torch.float32:
            torch.matmul(hidden, weight[block].T, out=logits)
        else:
            logits.copy_(hidden @ weight[block].T)
        yield block, logits


def _gather_targets(logits: Tensor, block: slice, targets: Tensor, gathered: Tensor) -> Tensor:
    """``gathered`` with the logit of each target that falls in the vocabulary ``block`` filled in."""
    local = targets - block.start  # [C]
    inside = (local >= 0) & (local < logits.shape[1])  # [C]
    values = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)  # [C]
    return torch.where(inside, values, gathered)


class _RunningSoftmax:
    """Softmax statistics of a set of rows, accumulated over vocabulary blocks (online log-sum-exp).

    Keeps the running max ``m`` and ``s = Σ exp(z - m)`` per row. ``update`` returns the block's
    ``exp(z - m)`` and ``exp(m_old - m_new)``, the factor by which every other accumulator of the
    form ``Σ exp(z - m)·x`` must be rescaled.
    """

    def __init__(self) -> None:
        self.max: Tensor | None = None  # [C]
        self.sum: Tensor | None = None  # [C]
        self._weights_buffer: Tensor | None = None  # reused by every block (the first is the widest)

    def update(self, logits: Tensor) -> tuple[Tensor, Tensor]:  # logits [C, Vb] float32
        block_max = logits.amax(-1)  # [C]
        if self.max is None or self.sum is None or self._weights_buffer is None:
            self.max, self.sum = block_max, torch.zeros_like(block_max)
            self._weights_buffer = torch.empty(logits.numel(), dtype=logits.dtype, device=logits.device)
        new_max = torch.maximum(self.max, block_max)  # [C]
        rescale = (self.max - new_max).exp()  # [C]
        weights = _buffer_view(self._weights_buffer, *logits.shape)  # [C, Vb]
        torch.sub(logits, new_max[:, None], out=weights).exp_()
        self.sum = self.sum * rescale + weights.sum(-1)
        self.max = new_max
        return weights, rescale

    def log_normalizer(self) -> Tensor:
        """``logsumexp(z)`` over all blocks seen, ``[C]``."""
        assert self.max is not None and self.sum is not None
        return self.max + self.sum.log()


def _teacher_stats_chunk(hidden: Tensor, weight: Tensor, targets: Tensor, vocab_chunk_size: int):
    """``(log p(y) [C], entropy [C])``. Logits are centred on the first block's row max ``z0``, so
    ``H = logsumexp(c) - E_p[c]`` with ``c = z - z0`` involves no large cancelling terms."""
    running = _RunningSoftmax()
    target_logit = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [C]
    expected = torch.zeros_like(target_logit)  # [C] Σ exp(c - m)·c
    reference = None
    for block, logits in _logit_blocks(hidden, weight, vocab_chunk_size):
        if reference is None:
            reference = logits.amax(-1, keepdim=True)  # [C, 1] z0
        centred = logits.sub_(reference)  # [C, Vb] c
        target_logit = _gather_targets(centred, block, targets, target_logit)
        weights, rescale = running.update(centred)
        expected = expected * rescale + torch.einsum("cv,cv->c", weights, centred)
    assert running.sum is not None
    log_normalizer = running.log_normalizer()  # [C]
    return target_logit - log_normalizer, log_normalizer - expected / running.sum


class _Chunk(NamedTuple):
    values: Tensor  # [C] float32
    saved: (
        Tensor  # [C, k] per-position constants a weight backward needs (logsumexp of each distribution, ...)
    )
    jacobian: Tensor | None  # [C, D] d value / d hidden, when asked for


def _sampled_logp_chunk(hidden, weight, targets, *, vocab_chunk_size, with_jacobian) -> _Chunk:
    """``log p(y) = z_y - logsumexp(z)``; ``d/dh = W_y - E_p[W_v]``."""
    running = _RunningSoftmax()
    target_logit = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [C]
    expected_row = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [C, D]
    for block, logits in _logit_blocks(hidden, weight, vocab_chunk_size):
        target_logit = _gather_targets(logits, block, targets, target_logit)
        weights, rescale = running.update(logits)
        if with_jacobian:
            expected_row = expected_row * rescale[:, None] + weights.to(weight.dtype) @ weight[block]
    log_normalizer = running.log_normalizer()  # [C]
    assert running.sum is not None
    jacobian = weight[targets] - expected_row / running.sum[:, None] if with_jacobian else None
    return _Chunk(target_logit - log_normalizer, log_normalizer[:, None], jacobian)


def _sampled_logp_grad_logits(logits, block, targets, saved, *, weight) -> Tensor:
    """``d log p(y) / d z = onehot(y) - softmax(z)`` on one vocabulary block, ``[C, Vb]``."""
    grad = logits.sub_(saved[:, :1]).exp_().neg_()  # [C, Vb]
    local = targets - block.start  # [C]
    inside = ((local >= 0) & (local < logits.shape[1])).to(grad.dtype)  # [C]
    return grad.scatter_add_(1, local.clamp(0, logits.shape[1] - 1)[:, None], inside[:, None])


def _kl_chunk(hidden, weight, teacher_hidden, *, reverse, vocab_chunk_size, with_jacobian) -> _Chunk:
    """One pass for both directions of the KL between student ``z_θ`` and teacher ``z_T`` logits.

    With ``d = z_θ - z_T`` and ``q`` the distribution the KL is taken under (``p_T`` forward, ``p_θ``
    reverse), ``KL = ∓E_q[d] ∓ logsumexp(z_T) ± logsumexp(z_θ)`` (upper sign forward). Student-side ``d/dh``:

    - forward ``KL(p_T ‖ p_θ)``: ``d/dz_θ = p_θ - p_T``, so ``d/dh = E_θ[W] - E_T[W]``;
    - reverse ``KL(p_θ ‖ p_T)``: ``d/dz_θ = p_θ ⊙ (log p_θ - log p_T - KL) = p_θ ⊙ (d - E_θ[d])`` (the
      normalisers cancel against the KL), so ``d/dh = E_θ[d·W] - E_θ[d]·E_θ[W]``.

    ``saved`` holds ``logsumexp(z_θ)``, ``logsumexp(z_T)`` and, reverse only, ``E_θ[d]``.
    """
    student, teacher = _RunningSoftmax(), _RunningSoftmax()
    cross = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [C] Σ e_q·d
    student_row = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [C, D] Σ e_θ·W
    q_row = torch.zeros_like(student_row)  # [C, D] forward Σ e_T·W, reverse Σ e_θ·d·W
    blocks = zip(
        _logit_blocks(hidden, weight, vocab_chunk_size),
        _logit_blocks(teacher_hidden, weight, vocab_chunk_size),
        strict=True,
    )
    for (block, student_logits), (_, teacher_logits) in blocks:
        teacher_weights, teacher_rescale = teacher.update(teacher_logits)
        student_weights, student_rescale = student.update(student_logits)
        log_ratio = student_logits.sub_(teacher_logits)  # [C, Vb] d = z_θ - z_T (weights have own buffers)
        q_weights, q_rescale = (
            (student_weights, student_rescale) if reverse else (teacher_weights, teacher_rescale)
        )
        cross = cross * q_rescale + torch.einsum("cv,cv->c", q_weights, log_ratio)
        if with_jacobian:
            w = weight[block]
            student_row = student_row * student_rescale[:, None] + student_weights.to(w.dtype) @ w
            q_terms = log_ratio.mul_(student_weights) if reverse else teacher_weights  # [C, Vb]
            q_row = q_row * q_rescale[:, None] + q_terms.to(w.dtype) @ w
    assert student.sum is not None and teacher.sum is not None
    student_log_normalizer, teacher_log_normalizer = student.log_normalizer(), teacher.log_normalizer()
    saved = [student_log_normalizer, teacher_log_normalizer]
    if reverse:
        mean_log_ratio = cross / student.sum  # [C] E_θ[d]
        kl = mean_log_ratio - student_log_normalizer + teacher_log_normalizer  # [C]
        saved.append(mean_log_ratio)
    else:
        kl = -cross / teacher.sum - teacher_log_normalizer + student_log_normalizer  # [C]
    jacobian = None
    if with_jacobian:
        student_mean_row = student_row / student.sum[:, None]  # [C, D] E_θ[W]
        if reverse:
            jacobian = q_row / student.sum[:, None] - saved[2][:, None] * student_mean_row
        else:
            jacobian = student_mean_row - q_row / teacher.sum[:, None]
    return _Chunk(kl, torch.stack(saved, 1), jacobian)


def _kl_grad_logits(logits, block, teacher_hidden, saved, *, weight, reverse) -> Tensor:
    """``d KL / d z_θ`` on one vocabulary block, ``[C, Vb]``: ``p_θ - p_T`` (forward) or
    ``p_θ ⊙ (z_θ - z_T - E_θ[z_θ - z_T])`` (reverse)."""
    teacher_logits = _project(teacher_hidden, weight[block])  # [C, Vb]
    if reverse:
        centred_log_ratio = (logits - teacher_logits).sub_(saved[:, 2:3])  # [C, Vb] d - E_θ[d]
        return logits.sub_(saved[:, :1]).exp_().mul_(centred_log_ratio)
    teacher_probs = teacher_logits.sub_(saved[:, 1:2]).exp_()  # [C, Vb]
    return logits.sub_(saved[:, :1]).exp_().sub_(teacher_probs)


class _Reduction(NamedTuple):
    """A per-position reduction over the vocabulary, as the two passes the autograd function needs.

    ``chunk(hidden [C, D], weight, constant [C, ...], *, vocab_chunk_size, with_jacobian)`` gives the
    values (and ``d value / d hidden`` rows); ``grad_logits(logits [C, Vb], block, constant,
    saved, *, weight)`` gives ``d value / d logits`` on one vocabulary block (backward
    when the weight is trained).
    """

    chunk: Callable[..., _Chunk]
    grad_logits: Callable[..., Tensor]


_SAMPLED_LOGP = _Reduction(_sampled_logp_chunk, _sampled_logp_grad_logits)
KLDirection = Literal["forward", "reverse"]
_KL: dict[str, _Reduction] = {
    direction: _Reduction(partial(_kl_chunk, reverse=reverse), partial(_kl_grad_logits, reverse=reverse))
    for direction, reverse in (("forward", False), ("reverse", True))
}


class _ChunkedReduction(torch.autograd.Function):
    """``value[n] = reduction(hidden[n] @ weight.T, constant[n])`` over flat positions ``n``."""

    @staticmethod
    def forward(ctx, hidden, weight, constant, reduction, chunk_size, vocab_chunk_size):
        ctx.reduction, ctx.chunk_size, ctx.vocab_chunk_size = reduction, chunk_size, vocab_chunk_size
        ctx.precomputed = not ctx.needs_input_grad[1]  # frozen weight: d value / d hidden rows now
        values = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [N]
        jacobian = torch.empty_like(hidden) if ctx.precomputed else None  # [N, D]
        saved = []
        for chunk in _chunks(hidden.shape[0], chunk_size):
            result = reduction.chunk(
                hidden[chunk],
                weight,
                constant[chunk],
                vocab_chunk_size=vocab_chunk_size,
                with_jacobian=ctx.precomputed,
            )
            values[chunk] = result.values
            saved.append(result.saved)
            if jacobian is not None:
                jacobian[chunk] = result.jacobian
        if ctx.precomputed:
            ctx.save_for_backward(jacobian)
        else:
            ctx.save_for_backward(hidden, weight, constant, torch.cat(saved))
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values):  # grad_values [N]
        if ctx.precomputed:
            (jacobian,) = ctx.saved_tensors
            return (grad_values[:, None] * jacobian).to(jacobian.dtype), None, None, None, None, None
        hidden, weight, constant, saved = ctx.saved_tensors
        with _without_autocast(hidden.device):
            return _ChunkedReduction.weight_backward(ctx, grad_values, hidden, weight, constant, saved)

    @staticmethod
    def weight_backward(ctx, grad_values, hidden, weight, constant, saved):
        """Gradients when the weight is trained: logits re-projected block by block."""
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [N, D]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, D]
        for chunk in _chunks(hidden.shape[0], ctx.chunk_size):
            for block in _chunks(weight.shape[0], ctx.vocab_chunk_size):
                logits = _project(hidden[chunk], weight[block])  # [C, Vb]
                grad_logits = ctx.reduction.grad_logits(
                    logits, block, constant[chunk], saved[chunk], weight=weight
                ).mul_(grad_values[chunk, None])  # [C, Vb]
                if ctx.needs_input_grad[0]:
                    grad_hidden[chunk] += grad_logits @ weight[block].float()
                grad_weight[block] += grad_logits.T @ hidden[chunk].float()
        grad_hidden_out = grad_hidden.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        return grad_hidden_out, grad_weight.to(weight.dtype), None, None, None, None


def _reduce(hidden, weight, constant, reduction: _Reduction, chunk_size: int, vocab_chunk_size: int):
    """Values ``[N]`` of ``reduction`` at every flat position, differentiable when grad mode needs it."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        with _without_autocast(hidden.device):
            return _ChunkedReduction.apply(hidden, weight, constant, reduction, chunk_size, vocab_chunk_size)
    with torch.no_grad(), _without_autocast(hidden.device):
        values = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [N]
        for chunk in _chunks(hidden.shape[0], chunk_size):
            values[chunk] = reduction.chunk(
                hidden[chunk], weight, constant[chunk], vocab_chunk_size=vocab_chunk_size, with_jacobian=False
            ).values
        return values


def _check_projection(hidden, weight, chunk_size, vocab_chunk_size, mask, name: str) -> None:
    check_ndim(hidden, 3, name)
    check_ndim(weight, 2, "weight")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must have shape [V, {hidden.shape[2]}], got {tuple(weight.shape)}")
    check_chunk_size(chunk_size, "chunk_size")
    check_chunk_size(vocab_chunk_size, "vocab_chunk_size")
    if mask is not None:
        check_bool_mask(mask, shape=tuple(hidden.shape[:2]))


def _check_targets(targets: Tensor, hidden: Tensor) -> None:
    check_shape(targets, tuple(hidden.shape[:2]), "targets")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")


def _flat_positions(tensor: Tensor, mask: Tensor | None) -> Tensor:
    """``[B, T, ...] -> [M, ...]``: every position, or only those where ``mask`` is set."""
    flat = tensor.reshape(-1, *tensor.shape[2:])
    return flat if mask is None else flat[mask.reshape(-1)]


def _unflatten(values: Tensor, mask: Tensor | None, shape: torch.Size) -> Tensor:
    """``[M] -> [B, T]``, zeros where ``mask`` is not set (differentiable)."""
    if mask is None:
        return values.reshape(shape)
    return values.new_zeros(shape).masked_scatter(mask, values)


def teacher_token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 1024,
    vocab_chunk_size: int = 16384,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher log-prob of each sampled token and teacher entropy, without gradient (docs/algorithm.md#step-5-teacher-entropy, step 9).

    ``log p_T(y_t) = log_softmax(h_t W^T)[y_t]`` and ``H_t = -Σ_v p_T(v) log p_T(v)`` over the full
    vocabulary, reduced in float32 (also under autocast). Extra memory is ``O(chunk_size x vocab_chunk_size)``.

    Args:
        hidden: ``[B, T, D]`` final-norm hidden states at the positions that predict each completion token.
        weight: ``[V, D]`` output projection (``lm_head.weight``).
        targets: ``[B, T]`` completion token ids (valid ids in ``[0, V)`` everywhere, padding included).
        chunk_size: Flat positions (over ``B * T``) processed at once.
        vocab_chunk_size: Rows of ``weight`` projected at once.
        mask: Optional ``[B, T]`` bool; only positions where it is set are projected, others give 0.

    Returns:
        ``(logp, entropy)``, each ``[B, T]`` float32, in nats.
    """
    _check_projection(hidden, weight, chunk_size, vocab_chunk_size, mask, "hidden")
    _check_targets(targets, hidden)
    with torch.no_grad(), _without_autocast(hidden.device):
        flat_hidden = _flat_positions(hidden, mask)  # [M, D]
        flat_targets = _flat_positions(targets, mask)  # [M]
        logp = torch.empty(flat_hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [M]
        entropy = torch.empty_like(logp)  # [M]
        for chunk in _chunks(flat_hidden.shape[0], chunk_size):
            logp[chunk], entropy[chunk] = _teacher_stats_chunk(
                flat_hidden[chunk], weight, flat_targets[chunk], vocab_chunk_size
            )
        return _unflatten(logp, mask, targets.shape), _unflatten(entropy, mask, targets.shape)


def student_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 1024,
    vocab_chunk_size: int = 16384,
    mask: Tensor | None = None,
) -> Tensor:
    """Student log-prob of each sampled token, ``log p_θ(y_t)``, with its gradient (docs/algorithm.md#step-11-loss).

    Differentiable w.r.t. ``hidden`` (and ``weight`` when it requires grad); full logits are never
    stored for backward (see the module docstring).

    Args:
        hidden: ``[B, T, D]`` final-norm hidden states at the positions that predict each completion token.
        weight: ``[V, D]`` output projection (``lm_head.weight``).
        targets: ``[B, T]`` completion token ids (valid ids in ``[0, V)`` everywhere, padding included).
        chunk_size: Flat positions (over ``B * T``) processed at once.
        vocab_chunk_size: Rows of ``weight`` projected at once.
        mask: Optional ``[B, T]`` bool; only positions where it is set are projected, others give 0.

    Returns:
        ``[B, T]`` float32 log-probabilities.
    """
    _check_projection(hidden, weight, chunk_size, vocab_chunk_size, mask, "hidden")
    _check_targets(targets, hidden)
    flat_hidden = _flat_positions(hidden, mask)  # [M, D]
    flat_targets = _flat_positions(targets, mask)  # [M]
    logp = _reduce(flat_hidden, weight, flat_targets, _SAMPLED_LOGP, chunk_size, vocab_chunk_size)  # [M]
    return _unflatten(logp, mask, targets.shape)  # [B, T]


def token_kl(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    *,
    direction: KLDirection = "forward",
    chunk_size: int = 1024,
    vocab_chunk_size: int = 16384,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-token KL between student and teacher over the full vocabulary, unscaled logits (T = 1).

    - ``direction="forward"`` (OPSD): ``KL(p_T ‖ p_θ) = Σ_v p_T(v) (log p_T(v) - log p_θ(v))``.
    - ``direction="reverse"`` (CRISP): ``KL(p_θ ‖ p_T) = Σ_v p_θ(v) (log p_θ(v) - log p_T(v))``.

    Both distributions are built from the same output projection (same backbone). The teacher is a
    constant: the gradient flows to ``student_hidden`` only (and to ``weight`` through the student
    side only, if it requires grad). Both directions are one chunked reduction (see the module docstring).

    Args:
        student_hidden: ``[B, T, D]`` student hidden states predicting each completion token.
        teacher_hidden: ``[B, T, D]`` teacher hidden states at the same completion tokens.
        weight: ``[V, D]`` output projection.
        direction: ``"forward"`` or ``"reverse"``, as above.
        chunk_size: Flat positions (over ``B * T``) processed at once.
        vocab_chunk_size: Rows of ``weight`` projected at once.
        mask: Optional ``[B, T]`` bool; only positions where it is set are projected, others give 0.

    Returns:
        ``[B, T]`` float32 KL divergences in nats.
    """
    if direction not in _KL:
        raise ValueError(f"direction must be one of {get_args(KLDirection)}, got {direction!r}")
    _check_projection(student_hidden, weight, chunk_size, vocab_chunk_size, mask, "student_hidden")
    check_shape(teacher_hidden, tuple(student_hidden.shape), "teacher_hidden")
    flat_student = _flat_positions(student_hidden, mask)  # [M, D]
    flat_teacher = _flat_positions(teacher_hidden.detach(), mask)  # [M, D]
    kl = _reduce(flat_student, weight, flat_teacher, _KL[direction], chunk_size, vocab_chunk_size)  # [M]
    return _unflatten(kl, mask, student_hidden.shape[:2])  # [B, T]
