"""Chunked vocabulary projections: hand-computed cases and chunked == naive (values and gradients)."""

import math

import pytest
import torch

from egrsd_pl.losses import student_token_logprobs, teacher_token_stats, token_kl

LN2, LN3 = math.log(2.0), math.log(3.0)

# V = 3, D = 2: logits of hidden [a, b] are [a, b, 0].
TINY_WEIGHT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # [V, D]


def naive_log_probs(hidden, weight):
    """The reference peer: full [B, T, V] logits, then log_softmax in float32."""
    return torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [B, T, V]


def naive_token_stats(hidden, weight, targets):
    log_probs = naive_log_probs(hidden, weight)  # [B, T, V]
    logp = log_probs.gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [B, T]
    return logp, entropy


def naive_kl(student_hidden, teacher_hidden, weight, direction="forward"):
    """Full-logit KL; the teacher side is a constant (its weight detached too)."""
    student = naive_log_probs(student_hidden, weight)  # [B, T, V]
    teacher = naive_log_probs(teacher_hidden.detach(), weight.detach())  # [B, T, V]
    if direction == "reverse":
        return (student.exp() * (student - teacher)).sum(-1)  # [B, T] KL(p_θ || p_T)
    return (teacher.exp() * (teacher - student)).sum(-1)  # [B, T] KL(p_T || p_θ)


def random_case(seed=0, batch=3, length=7, hidden_size=16, vocab=50, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=generator).to(dtype)
    teacher_hidden = torch.randn(batch, length, hidden_size, generator=generator).to(dtype)
    weight = (0.5 * torch.randn(vocab, hidden_size, generator=generator)).to(dtype)
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    upstream = torch.randn(batch, length, generator=generator)  # random d loss / d value
    return hidden, teacher_hidden, weight, targets, upstream


def test_teacher_token_stats_hand_computed():
    # Position 0: hidden [0, 0] -> uniform over 3: logp = -ln 3 = -1.098612, H = ln 3 = 1.098612.
    # Position 1: hidden [ln 2, 0] -> logits [ln 2, 0, 0], p = [1/2, 1/4, 1/4]; target 0:
    #   logp = ln(1/2) = -0.693147; H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2 = 1.039721.
    # Position 2: same hidden, target 1: logp = ln(1/4) = -1.386294, H = 1.039721.
    hidden = torch.tensor([[[0.0, 0.0], [LN2, 0.0], [LN2, 0.0]]])  # [1, 3, 2]
    targets = torch.tensor([[2, 0, 1]])
    logp, entropy = teacher_token_stats(hidden, TINY_WEIGHT, targets, chunk_size=2, vocab_chunk_size=2)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, torch.tensor([[-LN3, -LN2, -2 * LN2]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor([[LN3, 1.5 * LN2, 1.5 * LN2]]), atol=1e-6, rtol=0)


def test_student_logprob_gradient_hand_computed():
    # hidden [ln 2, 0], target 0: d logp / d logits = onehot - p = [1/2, -1/4, -1/4];
    # times W: d logp / d hidden = [1/2, -1/4].  Upstream gradient 2 -> [1, -1/2].
    hidden = torch.tensor([[[LN2, 0.0]]], requires_grad=True)  # [1, 1, 2]
    logp = student_token_logprobs(hidden, TINY_WEIGHT, torch.tensor([[0]]), vocab_chunk_size=2)
    (2.0 * logp).sum().backward()
    torch.testing.assert_close(logp.detach(), torch.tensor([[-LN2]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden.grad, torch.tensor([[[1.0, -0.5]]]), atol=1e-6, rtol=0)


def test_token_kl_hand_computed():
    # Student uniform [1/3]*3, teacher [1/2, 1/4, 1/4]:
    #   KL = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 0.202733 - 0.143841 = 0.058892.
    # d KL / d student logits = p_S - p_T = [-1/6, 1/12, 1/12]; times W: [-1/6, 1/12].
    student = torch.zeros(1, 1, 2, requires_grad=True)
    teacher = torch.tensor([[[LN2, 0.0]]], requires_grad=True)
    kl = token_kl(student, teacher, TINY_WEIGHT, vocab_chunk_size=2)
    kl.sum().backward()
    torch.testing.assert_close(kl.detach(), torch.tensor([[0.058892]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(student.grad, torch.tensor([[[-1 / 6, 1 / 12]]]), atol=1e-6, rtol=0)
    assert teacher.grad is None


def test_reverse_token_kl_hand_computed():
    # Token 1: student [ln 2, 0] -> p_S = [1/2, 1/4, 1/4]; teacher [0, 0] -> p_T = [1/3] * 3.
    #   l = log p_S - log p_T = [ln(3/2), ln(3/4), ln(3/4)];
    #   KL(p_S || p_T) = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8) = 0.058892.
    #   d KL / d z_S = p_S * (l - KL) = p_S * [ln 2 / 2, -ln 2 / 2, -ln 2 / 2] = [ln 2/4, -ln 2/8, -ln 2/8];
    #   times W: d KL / d hidden = [ln 2 / 4, -ln 2 / 8] = [0.173287, -0.086643].
    # Token 2: student [0, 0] -> p_S = [1/3] * 3; teacher [ln 2, 0] -> p_T = [1/2, 1/4, 1/4].
    #   l = [ln(2/3), ln(4/3), ln(4/3)]; KL = 1/3 ln(2/3) + 2/3 ln(4/3) = 1/3 ln(32/27) = 0.056633.
    #   l - KL = [-2/3 ln 2, 1/3 ln 2, 1/3 ln 2]; p_S * (l - KL) = [-2/9 ln 2, 1/9 ln 2, 1/9 ln 2];
    #   times W: [-2/9 ln 2, 1/9 ln 2] = [-0.154033, 0.077016].
    # (The forward KL(p_T || p_S) of token 1 is 1/3 ln(2/3) + 2/3 ln(4/3) = 0.056633, not 0.058892.)
    student = torch.tensor([[[LN2, 0.0], [0.0, 0.0]]], requires_grad=True)  # [1, 2, 2]
    teacher = torch.tensor([[[0.0, 0.0], [LN2, 0.0]]], requires_grad=True)  # [1, 2, 2]
    kl = token_kl(student, teacher, TINY_WEIGHT, direction="reverse", chunk_size=1, vocab_chunk_size=2)
    kl.sum().backward()
    torch.testing.assert_close(kl.detach(), torch.tensor([[0.058892, 0.056633]]), atol=1e-6, rtol=0)
    expected_grad = torch.tensor([[[LN2 / 4, -LN2 / 8], [-2 * LN2 / 9, LN2 / 9]]])
    torch.testing.assert_close(student.grad, expected_grad, atol=1e-6, rtol=0)
    assert teacher.grad is None  # the teacher is a constant
    forward = token_kl(student.detach(), teacher, TINY_WEIGHT, vocab_chunk_size=2)
    torch.testing.assert_close(forward[0, 0], torch.tensor(0.056633), atol=1e-6, rtol=0)


# (positions, vocabulary rows) per block; N = 3 * 7 = 21 positions, V = 50: most do not divide.
CHUNKS = [(1, 7), (4, 16), (5, 50), (21, 13), (1024, 16384)]
CHUNK_IDS = [f"chunk{c}x{v}" for c, v in CHUNKS]


@pytest.mark.parametrize(("chunk_size", "vocab_chunk_size"), CHUNKS, ids=CHUNK_IDS)
def test_teacher_token_stats_chunked_equals_naive(chunk_size, vocab_chunk_size):
    hidden, _, weight, targets, _ = random_case()
    logp, entropy = teacher_token_stats(
        hidden, weight, targets, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size
    )
    naive_logp, naive_entropy = naive_token_stats(hidden, weight, targets)
    torch.testing.assert_close(logp, naive_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, naive_entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight_requires_grad", [False, True], ids=["frozen_weight", "trained_weight"])
@pytest.mark.parametrize(("chunk_size", "vocab_chunk_size"), CHUNKS, ids=CHUNK_IDS)
def test_student_logprobs_chunked_equals_naive(chunk_size, vocab_chunk_size, weight_requires_grad):
    hidden, _, weight, targets, upstream = random_case(seed=1)
    weight.requires_grad_(weight_requires_grad)
    chunked_hidden = hidden.clone().requires_grad_()
    logp = student_token_logprobs(
        chunked_hidden, weight, targets, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size
    )
    (logp * upstream).sum().backward()
    chunked_weight_grad = weight.grad
    weight.grad = None

    naive_hidden = hidden.clone().requires_grad_()
    naive_logp = naive_log_probs(naive_hidden, weight).gather(-1, targets[..., None]).squeeze(-1)
    (naive_logp * upstream).sum().backward()

    torch.testing.assert_close(logp.detach(), naive_logp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_hidden.grad, naive_hidden.grad, atol=1e-5, rtol=0)
    if weight_requires_grad:
        torch.testing.assert_close(chunked_weight_grad, weight.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("weight_requires_grad", [False, True], ids=["frozen_weight", "trained_weight"])
@pytest.mark.parametrize(("chunk_size", "vocab_chunk_size"), CHUNKS, ids=CHUNK_IDS)
def test_token_kl_chunked_equals_naive(chunk_size, vocab_chunk_size, weight_requires_grad, direction):
    hidden, teacher_hidden, weight, _, upstream = random_case(seed=2)
    weight.requires_grad_(weight_requires_grad)
    chunked_hidden = hidden.clone().requires_grad_()
    chunked_teacher = teacher_hidden.clone().requires_grad_()  # must receive no gradient
    kl = token_kl(
        chunked_hidden,
        chunked_teacher,
        weight,
        direction=direction,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    (kl * upstream).sum().backward()
    chunked_weight_grad = weight.grad
    weight.grad = None

    # The teacher is a constant: the reference's weight gradient flows through the student side only.
    naive_hidden = hidden.clone().requires_grad_()
    naive = naive_kl(naive_hidden, teacher_hidden, weight, direction)
    (naive * upstream).sum().backward()

    torch.testing.assert_close(kl.detach(), naive.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_hidden.grad, naive_hidden.grad, atol=1e-5, rtol=0)
    assert chunked_teacher.grad is None
    if weight_requires_grad:
        torch.testing.assert_close(chunked_weight_grad, weight.grad, atol=1e-5, rtol=0)


def test_reverse_kl_masked_positions_change_nothing():
    hidden, teacher_hidden, weight, _, upstream = random_case(seed=9)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [False] * 7])  # [3, 7]
    hidden.requires_grad_()
    kl = token_kl(
        hidden, teacher_hidden, weight, direction="reverse", chunk_size=4, vocab_chunk_size=16, mask=mask
    )
    (kl * upstream).sum().backward()
    naive = naive_kl(hidden.detach(), teacher_hidden, weight, "reverse")
    torch.testing.assert_close(kl.detach(), torch.where(mask, naive, 0.0), atol=1e-5, rtol=0)
    assert torch.equal(hidden.grad[~mask], torch.zeros_like(hidden.grad[~mask]))
    # Anything at a masked position (student or teacher) leaves every value unchanged.
    noisy_hidden, noisy_teacher = hidden.detach().clone(), teacher_hidden.clone()
    noisy_hidden[~mask], noisy_teacher[~mask] = 1e3, -1e3
    noisy = token_kl(
        noisy_hidden, noisy_teacher, weight, direction="reverse", chunk_size=4, vocab_chunk_size=16, mask=mask
    )
    assert torch.equal(noisy, kl.detach())


def test_reverse_kl_of_large_logits_and_bf16_inputs_stays_accurate():
    # Logits of standard deviation ~100 (every exp would overflow without the running max); then bf16
    # inputs with V = 4096, reduced in float32. References: the same logits reduced in float64.
    for scale, dtype, vocab, tolerance in [
        (50.0, torch.float32, 50, 2e-4),
        (1.0, torch.bfloat16, 4096, 1e-5),
    ]:
        hidden, teacher_hidden, weight, _, _ = random_case(seed=6, vocab=vocab, dtype=dtype)
        hidden, teacher_hidden = scale * hidden, scale * teacher_hidden
        kl = token_kl(hidden, teacher_hidden, weight, direction="reverse", chunk_size=5, vocab_chunk_size=7)
        assert kl.dtype == torch.float32
        log_probs = torch.log_softmax((hidden @ weight.T).double(), -1)  # [B, T, V]
        teacher_log_probs = torch.log_softmax((teacher_hidden @ weight.T).double(), -1)  # [B, T, V]
        reference = (log_probs.exp() * (log_probs - teacher_log_probs)).sum(-1)  # [B, T]
        torch.testing.assert_close(kl.double(), reference, atol=tolerance, rtol=1e-5)


def test_no_grad_mode_gives_values_without_graph():
    hidden, teacher_hidden, weight, targets, _ = random_case(seed=3)
    hidden.requires_grad_()
    with torch.no_grad():
        logp = student_token_logprobs(hidden, weight, targets, chunk_size=4, vocab_chunk_size=16)
        kl = token_kl(hidden, teacher_hidden, weight, chunk_size=4, vocab_chunk_size=16)
    assert not logp.requires_grad and not kl.requires_grad
    torch.testing.assert_close(
        logp, naive_token_stats(hidden.detach(), weight, targets)[0], atol=1e-5, rtol=0
    )


def test_mask_projects_only_completion_positions():
    hidden, teacher_hidden, weight, targets, upstream = random_case(seed=4)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [False] * 7])  # [3, 7]
    hidden.requires_grad_()
    logp = student_token_logprobs(hidden, weight, targets, chunk_size=4, vocab_chunk_size=16, mask=mask)
    (logp * upstream).sum().backward()
    naive_logp, naive_entropy = naive_token_stats(hidden.detach(), weight, targets)
    torch.testing.assert_close(logp.detach(), torch.where(mask, naive_logp, 0.0), atol=1e-5, rtol=0)
    assert torch.equal(hidden.grad[~mask], torch.zeros_like(hidden.grad[~mask]))

    teacher_logp, entropy = teacher_token_stats(
        hidden, weight, targets, chunk_size=4, vocab_chunk_size=16, mask=mask
    )
    torch.testing.assert_close(entropy, torch.where(mask, naive_entropy, 0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher_logp, torch.where(mask, naive_logp, 0.0), atol=1e-5, rtol=0)
    kl = token_kl(hidden, teacher_hidden, weight, chunk_size=4, vocab_chunk_size=16, mask=mask)
    naive = naive_kl(hidden.detach(), teacher_hidden, weight)
    torch.testing.assert_close(kl.detach(), torch.where(mask, naive, 0.0), atol=1e-5, rtol=0)


def test_bf16_inputs_accumulate_in_float32():
    # V = 4096: a bf16 sum over the vocabulary would be off by far more than the tolerance below.
    hidden, teacher_hidden, weight, targets, _ = random_case(seed=5, vocab=4096, dtype=torch.bfloat16)
    hidden.requires_grad_()
    logp, entropy = teacher_token_stats(hidden, weight, targets, chunk_size=5, vocab_chunk_size=1000)
    student_logp = student_token_logprobs(hidden, weight, targets, chunk_size=5, vocab_chunk_size=1000)
    kl = token_kl(hidden, teacher_hidden, weight, chunk_size=5, vocab_chunk_size=1000)
    assert logp.dtype == entropy.dtype == student_logp.dtype == kl.dtype == torch.float32
    student_logp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16

    # Reference: the same bf16 logits, reduced in float64.
    log_probs = torch.log_softmax((hidden.detach() @ weight.T).double(), -1)  # [B, T, V]
    reference_logp = log_probs.gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
    torch.testing.assert_close(logp.double(), reference_logp, atol=1e-5, rtol=1e-5)
    reference_entropy = -(log_probs.exp() * log_probs).sum(-1)  # [B, T]
    torch.testing.assert_close(entropy.double(), reference_entropy, atol=1e-5, rtol=1e-5)
    teacher_log_probs = torch.log_softmax((teacher_hidden @ weight.T).double(), -1)
    reference_kl = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum(-1)
    torch.testing.assert_close(kl.detach().double(), reference_kl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda h, w, t: teacher_token_stats(h[0], w, t), "hidden"),
        (lambda h, w, t: teacher_token_stats(h, w[:, :3], t), "weight"),
        (lambda h, w, t: teacher_token_stats(h, w, t[:, :2]), "targets"),
        (lambda h, w, t: teacher_token_stats(h, w, t.float()), "targets"),
        (lambda h, w, t: student_token_logprobs(h, w, t, chunk_size=0), "chunk_size"),
        (lambda h, w, t: token_kl(h, h, w, vocab_chunk_size=0), "vocab_chunk_size"),
        (lambda h, w, t: student_token_logprobs(h, w, t, mask=torch.ones_like(t)), "mask"),
        (lambda h, w, t: token_kl(h, h[:, :2], w), "teacher_hidden"),
        (lambda h, w, t: token_kl(h[0], h[0], w), "student_hidden"),
        (lambda h, w, t: token_kl(h, h, w, direction="backward"), "direction"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, argument):
    hidden, _, weight, targets, _ = random_case()
    with pytest.raises(ValueError, match=argument):
        call(hidden, weight, targets)


def test_large_logits_stay_accurate():
    # Logits of standard deviation ~100: every exp would overflow without the running max.
    hidden, teacher_hidden, weight, targets, _ = random_case(seed=6)
    hidden, teacher_hidden = 50 * hidden, 50 * teacher_hidden
    logp, entropy = teacher_token_stats(hidden, weight, targets, chunk_size=4, vocab_chunk_size=7)
    kl = token_kl(hidden, teacher_hidden, weight, chunk_size=4, vocab_chunk_size=7)
    log_probs = torch.log_softmax((hidden @ weight.T).double(), -1)  # [B, T, V]
    teacher_log_probs = torch.log_softmax((teacher_hidden @ weight.T).double(), -1)  # [B, T, V]
    reference_kl = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum(-1)
    reference_entropy = -(log_probs.exp() * log_probs).sum(-1)
    reference_logp = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    # float32 logits of magnitude ~300 are rounded by ~3e-5 each (a naive float32 log_softmax is
    # off by 1.5e-5 here, its KL by 3e-5): allow a few roundings.
    torch.testing.assert_close(logp.double(), reference_logp, atol=2e-4, rtol=0)
    torch.testing.assert_close(entropy.double(), reference_entropy, atol=2e-4, rtol=0)
    torch.testing.assert_close(kl.double(), reference_kl, atol=2e-4, rtol=0)


def test_all_masked_positions_give_zeros_and_zero_gradient():
    hidden, teacher_hidden, weight, targets, _ = random_case(seed=7)
    hidden.requires_grad_()
    mask = torch.zeros(3, 7, dtype=torch.bool)
    logp = student_token_logprobs(hidden, weight, targets, mask=mask)
    kl = token_kl(hidden, teacher_hidden, weight, mask=mask)
    (logp.sum() + kl.sum()).backward()
    assert torch.equal(logp, torch.zeros(3, 7)) and torch.equal(kl, torch.zeros(3, 7))
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert all(
        torch.equal(x, torch.zeros(3, 7)) for x in teacher_token_stats(hidden, weight, targets, mask=mask)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_equals_naive_on_cuda():
    hidden, teacher_hidden, weight, targets, upstream = (t.cuda() for t in random_case(seed=8))
    hidden.requires_grad_()
    logp = student_token_logprobs(hidden, weight, targets, chunk_size=5, vocab_chunk_size=16)
    kl = token_kl(hidden, teacher_hidden, weight, chunk_size=5, vocab_chunk_size=16)
    ((logp + kl) * upstream).sum().backward()
    naive_hidden = hidden.detach().clone().requires_grad_()
    naive_logp = naive_log_probs(naive_hidden, weight).gather(-1, targets[..., None]).squeeze(-1)
    naive = naive_kl(naive_hidden, teacher_hidden, weight)
    ((naive_logp + naive) * upstream).sum().backward()
    # TF32 matmuls are off by default for float32 in PyTorch, so the float32 tolerance holds.
    torch.testing.assert_close(logp.detach(), naive_logp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(kl.detach(), naive.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad, naive_hidden.grad, atol=1e-5, rtol=0)
    _, entropy = teacher_token_stats(hidden, weight, targets, chunk_size=5, vocab_chunk_size=16)
    torch.testing.assert_close(
        entropy, naive_token_stats(hidden.detach(), weight, targets)[1], atol=1e-5, rtol=0
    )


def test_sums_stay_float32_under_bf16_autocast():
    # Lightning's bf16-mixed runs the loss under torch.autocast; autocast would run the entropy's and the
    # KL's einsum over the vocabulary in bfloat16 (about 3 significant digits). Inputs float32, V = 4096:
    # the results must equal the naive float32 computation outside autocast at float32 tolerance.
    hidden, teacher_hidden, weight, targets, upstream = random_case(seed=8, vocab=4096)
    hidden.requires_grad_()
    kwargs = dict(chunk_size=5, vocab_chunk_size=1000)
    reference_logp, reference_entropy = naive_token_stats(hidden.detach(), weight, targets)
    reference_kl = {d: naive_kl(hidden.detach(), teacher_hidden, weight, d) for d in ("forward", "reverse")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.einsum("cv,cv->c", weight, weight).dtype == torch.bfloat16  # what autocast would do
        logp, entropy = teacher_token_stats(hidden, weight, targets, **kwargs)
        kls = {d: token_kl(hidden, teacher_hidden, weight, direction=d, **kwargs) for d in reference_kl}
        student_logp = student_token_logprobs(hidden, weight, targets, **kwargs)
    (student_logp * upstream).sum().backward()
    torch.testing.assert_close(entropy, reference_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp, reference_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student_logp.detach(), reference_logp, atol=1e-5, rtol=1e-5)
    for direction, kl in kls.items():
        torch.testing.assert_close(kl, reference_kl[direction], atol=1e-5, rtol=1e-5)
    plain = hidden.detach().clone().requires_grad_()
    (student_token_logprobs(plain, weight, targets, **kwargs) * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, plain.grad, atol=1e-6, rtol=1e-5)
