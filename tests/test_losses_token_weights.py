"""Per-token factors: masked reductions, causal window minimum, normalisation, gate, magnitude, Â."""

import math

import pytest
import torch

from egrsd_pl.losses import (
    causal_window_min,
    confidence_gate,
    likelihood_ratio_magnitude,
    masked_max,
    masked_mean,
    masked_min,
    normalize_entropy,
    policy_gradient_loss,
    token_advantages,
)

NAN, INF = float("nan"), float("inf")


def test_masked_reductions_ignore_padding_even_nan():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, INF]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # mean over {1, 2, 4} = 7 / 3; max 4; min 1.
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor(7 / 3))
    assert masked_max(values, mask).item() == 4.0
    assert masked_min(values, mask).item() == 1.0


def test_masked_reductions_of_empty_mask_are_zero_with_zero_gradient():
    values = torch.tensor([[NAN, -INF]], requires_grad=True)
    mask = torch.zeros(1, 2, dtype=torch.bool)
    mean = masked_mean(values, mask)
    mean.backward()
    assert (
        mean.item() == 0.0 and masked_max(values, mask).item() == 0.0 and masked_min(values, mask).item() == 0
    )
    assert torch.equal(values.grad, torch.zeros(1, 2))


def test_causal_window_min_hand_computed():
    values = torch.tensor([[0.9, 0.2, 0.7, 0.4], [0.3, 0.8, 0.5, 0.1]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    # W = 1: row 0: min(.9,.2)=.2, min(.2,.7)=.2, min(.7,.4)=.4, min(.4)=.4 (truncated at the end);
    #        row 1: min(.3,.8)=.3, min(.8,.5)=.5, min(.5,.1)=.1, .1 (row 0 never leaks into row 1).
    expected_w1 = torch.tensor([[0.2, 0.2, 0.4, 0.4], [0.3, 0.5, 0.1, 0.1]])
    torch.testing.assert_close(causal_window_min(values, mask, 1), expected_w1)
    # W = 2: row 0: min(.9,.2,.7)=.2, min(.2,.7,.4)=.2, min(.7,.4)=.4, .4.
    torch.testing.assert_close(causal_window_min(values, mask, 2)[0], torch.tensor([0.2, 0.2, 0.4, 0.4]))
    # W = 0: unchanged.
    assert torch.equal(causal_window_min(values, mask, 0), values)


def test_causal_window_min_never_reads_padding():
    values = torch.tensor([[0.9, 0.5, 0.0, NAN]])
    mask = torch.tensor([[True, True, False, False]])
    # t0: min(.9, .5) = .5; t1: min(.5) = .5 (the padded 0.0 and NaN never enter); padding unchanged.
    result = causal_window_min(values, mask, 3)
    torch.testing.assert_close(result[:, :2], torch.tensor([[0.5, 0.5]]))
    assert result[0, 2].item() == 0.0 and math.isnan(result[0, 3].item())


def test_normalize_entropy_hand_computed():
    mask = torch.ones(1, 3, dtype=torch.bool)
    # max 2.0 -> [.5, 2, 1] / 2 = [.25, 1, .5].
    result = normalize_entropy(torch.tensor([[0.5, 2.0, 1.0]]), mask)
    torch.testing.assert_close(result, torch.tensor([[0.25, 1.0, 0.5]]))
    # max 0.5 < 1 nat -> denominator floored at 1: unchanged.
    small = torch.tensor([[0.2, 0.5, 0.1]])
    torch.testing.assert_close(normalize_entropy(small, mask), small)
    # An already-reduced maximum (e.g. all-reduced across ranks) of 4.0: divide by 4.
    result = normalize_entropy(torch.tensor([[0.5, 2.0, 1.0]]), mask, entropy_max=torch.tensor(4.0))
    torch.testing.assert_close(result, torch.tensor([[0.125, 0.5, 0.25]]))
    # A given maximum below 1 nat is floored too: 0.5 -> 1.
    torch.testing.assert_close(normalize_entropy(small, mask, entropy_max=0.5), small)
    # Padding (9.0) does not enter the maximum: max 0.5 -> floor 1.
    padded = torch.tensor([[0.5, 9.0]])
    torch.testing.assert_close(normalize_entropy(padded, torch.tensor([[True, False]])), padded)


def test_confidence_gate_hand_computed():
    entropy = torch.tensor([[0.5, 2.0, 1.0, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # Ĥ = H / 2 = [.25, 1, .5, 0]; γ = 0.3: ω = 1 - .3 Ĥ = [.925, .7, .85, 1].
    omega = confidence_gate(entropy, mask, gamma=0.3)
    torch.testing.assert_close(omega, torch.tensor([[0.925, 0.7, 0.85, 1.0]]))
    # γ = 1: [.75, 0 -> floor .1, .5, 1].
    omega = confidence_gate(entropy, mask, gamma=1.0)
    torch.testing.assert_close(omega, torch.tensor([[0.75, 0.1, 0.5, 1.0]]))
    # γ = 0 (RLSD): all ones.
    assert torch.equal(confidence_gate(entropy, mask, gamma=0.0), torch.ones(1, 4))


def test_cl_gate_divides_by_the_raw_entropy_maximum():
    entropy = torch.tensor([[0.5, 2.0, 1.0, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # W = 1: H^CL = [min(.5,2)=.5, min(2,1)=1, min(1,0)=0, 0]. Decision: divide by the raw max 2
    # (not by max H^CL = 1): Ĥ = [.25, .5, 0, 0] -> ω = [.925, .85, 1, 1].
    omega = confidence_gate(entropy, mask, gamma=0.3, window=1)
    torch.testing.assert_close(omega, torch.tensor([[0.925, 0.85, 1.0, 1.0]]))


def test_gate_is_one_at_padding_and_ignores_padded_entropy():
    entropy = torch.tensor([[0.5, 2.0, 1.0, NAN, 50.0]])
    mask = torch.tensor([[True, True, True, False, False]])
    omega = confidence_gate(entropy, mask, gamma=0.3, window=2)
    # H^CL = [.5, 1, 1] (padding excluded), raw max 2: ω = [.925, .85, .85]; padding 1.
    torch.testing.assert_close(omega, torch.tensor([[0.925, 0.85, 0.85, 1.0, 1.0]]))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0, 5.0])
def test_gate_bounds_and_cl_never_below_egrsd(gamma):
    generator = torch.Generator().manual_seed(0)
    entropy = 3.0 * torch.rand(6, 40, generator=generator) ** 2  # [B, T] in [0, 3) nats
    lengths = torch.tensor([40, 35, 20, 1, 0, 12])
    mask = torch.arange(40)[None, :] < lengths[:, None]  # [B, T]
    egrsd = confidence_gate(entropy, mask, gamma=gamma)
    assert egrsd.min() >= 0.1 and egrsd.max() <= 1.0
    for window in (1, 3, 5, 50):
        cl = confidence_gate(entropy, mask, gamma=gamma, window=window)
        assert cl.min() >= 0.1 and cl.max() <= 1.0
        assert torch.all(cl >= egrsd)


def test_likelihood_ratio_magnitude_hand_computed():
    student = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    teacher = torch.tensor([[-0.9, -2.5, -0.5]])
    # δ = teacher - student = [.1, -.5, 0].
    # D = +1: exp(δ) = [1.105171, .606531, 1] -> clip [.8, 1.2] -> [1.105171, .8, 1].
    magnitude = likelihood_ratio_magnitude(student, teacher, torch.tensor([1.0]), 0.2)
    torch.testing.assert_close(magnitude, torch.tensor([[1.105171, 0.8, 1.0]]))
    assert not magnitude.requires_grad  # p_S is detached
    # D = -1: exp(-δ) = [.904837, 1.648721, 1] -> [.904837, 1.2, 1].
    magnitude = likelihood_ratio_magnitude(student, teacher, torch.tensor([-1.0]), 0.2)
    torch.testing.assert_close(magnitude, torch.tensor([[0.904837, 1.2, 1.0]]))
    # D = 0 (A = 0): exp(0) = 1 everywhere.
    assert torch.equal(likelihood_ratio_magnitude(student, teacher, torch.tensor([0.0])), torch.ones(1, 3))


def test_token_advantages_and_policy_gradient_loss_hand_computed():
    advantages = torch.tensor([2.0, -1.0])
    magnitude = torch.tensor([[1.1, 0.8], [1.2, 1.0]])
    omega = torch.tensor([[0.5, 1.0], [1.0, 0.1]])
    mask = torch.tensor([[True, True], [True, False]])
    # Â = A w ω = [[2*1.1*.5, 2*.8*1], [-1*1.2*1, padding -> 0]] = [[1.1, 1.6], [-1.2, 0]].
    token_advantage = token_advantages(advantages, magnitude, omega, mask)
    torch.testing.assert_close(token_advantage, torch.tensor([[1.1, 1.6], [-1.2, 0.0]]))
    # L = -(1/3)(1.1*(-1) + 1.6*(-2) + (-1.2)*(-0.5)) = -(1/3)(-3.7) = 1.233333;
    # d L / d logp = -Â / 3 = [[-.366667, -.533333], [.4, 0]]; the padded -inf contributes nothing.
    student_logp = torch.tensor([[-1.0, -2.0], [-0.5, -INF]], requires_grad=True)
    loss = policy_gradient_loss(token_advantage, student_logp, mask)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(3.7 / 3))
    torch.testing.assert_close(student_logp.grad, torch.tensor([[-1.1, -1.6], [1.2, 0.0]]) / 3)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda h, m: confidence_gate(h, m, gamma=-0.1), "gamma"),
        (lambda h, m: confidence_gate(h, m, gamma=0.3, window=-1), "window"),
        (lambda h, m: confidence_gate(h, m, gamma=0.3, window=1.5), "window"),
        (lambda h, m: confidence_gate(h, m, gamma=0.3, omega_floor=1.5), "omega_floor"),
        (lambda h, m: confidence_gate(h, m, gamma=0.3, entropy_max=-1.0), "entropy_max"),
        (lambda h, m: confidence_gate(h, m.float(), gamma=0.3), "mask"),
        (lambda h, m: confidence_gate(h, m[:, :2], gamma=0.3), "mask"),
        (lambda h, m: confidence_gate(h[0], m, gamma=0.3), "teacher_entropy"),
        (lambda h, m: causal_window_min(h, m, -2), "window"),
        (lambda h, m: masked_mean(h, m.long()), "mask"),
        (lambda h, m: likelihood_ratio_magnitude(h, h, torch.ones(2), 0.2), "direction"),
        (lambda h, m: likelihood_ratio_magnitude(h, h[:, :2], torch.ones(1), 0.2), "teacher_logp"),
        (lambda h, m: likelihood_ratio_magnitude(h, h, torch.ones(1), 0.0), "eps"),
        (lambda h, m: likelihood_ratio_magnitude(h, h, torch.ones(1), 1.0), "eps"),
        (lambda h, m: token_advantages(torch.ones(3), h, h, m), "advantages"),
        (lambda h, m: token_advantages(torch.ones(1), h, h[:, :1], m), "omega"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, argument):
    entropy = torch.tensor([[0.5, 2.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=argument):
        call(entropy, mask)
