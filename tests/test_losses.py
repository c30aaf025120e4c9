"""losses.py as a specification: hand-worked values, exact reductions, gradient directions, the length
effect of iLR-DPO on a tiny policy, the registry contract and input validation (CPU, about a second).

Most tests use one batch of two pairs, B = 2:

    policy_chosen_logps    [-1, -3]      reference_chosen_logps    [-2, -2]      chosen_lengths   [2, 4]
    policy_rejected_logps  [-2, -1]      reference_rejected_logps  [-1, -2]      rejected_lengths [4, 2]

so r(y_w) = [1, -1], r(y_l) = [-1, 1], Delta = [2, -2], |y_w| - |y_l| = [-2, 2].
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses import LOSSES, bradley_terry_loss, loss_hyperparameters, sft_loss  # noqa: E402


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x), by hand."""
    return math.log1p(math.exp(x))


def batch(**overrides) -> dict[str, torch.Tensor]:
    tensors = {
        "policy_chosen_logps": torch.tensor([-1.0, -3.0]),
        "policy_rejected_logps": torch.tensor([-2.0, -1.0]),
        "reference_chosen_logps": torch.tensor([-2.0, -2.0]),
        "reference_rejected_logps": torch.tensor([-1.0, -2.0]),
        "chosen_lengths": torch.tensor([2, 4]),
        "rejected_lengths": torch.tensor([4, 2]),
    }
    return tensors | overrides


def check(actual: tuple[torch.Tensor, ...], losses, chosen_rewards, rejected_rewards):
    for got, want in zip(actual, (losses, chosen_rewards, rejected_rewards)):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


# 1. Every loss against a value worked out by hand.

def test_dpo_matches_hand_computed_value():
    """beta 0.5: rewards beta * r = [0.5, -0.5] and [-0.5, 0.5]; beta * Delta = [1, -1];
    L = -log sigma([1, -1]) = [log(1 + e^-1), log(1 + e)]."""
    check(LOSSES["dpo"].fn(**batch(), beta=0.5), [softplus(-1), softplus(1)], [0.5, -0.5], [-0.5, 0.5])


def test_ilrdpo_adds_the_length_margin_with_a_plus_sign():
    """beta 0.5, alpha 0.25: beta * Delta = [1, -1]; alpha * (|y_w| - |y_l|) = [-0.5, 0.5];
    z = [0.5, -0.5]; L = [log(1 + e^-0.5), log(1 + e^0.5)]. Rewards as DPO: the margin is not in them."""
    check(LOSSES["ilrdpo"].fn(**batch(), beta=0.5, alpha=0.25),
          [softplus(-0.5), softplus(0.5)], [0.5, -0.5], [-0.5, 0.5])


def test_lndpo_matches_hand_computed_value():
    """beta 1: r(y_w)/|y_w| = [1/2, -1/4], r(y_l)/|y_l| = [-1/4, 1/2]; z = [0.75, -0.75];
    L = [log(1 + e^-0.75), log(1 + e^0.75)]."""
    check(LOSSES["lndpo"].fn(**batch(), beta=1.0),
          [softplus(-0.75), softplus(0.75)], [0.5, -0.25], [-0.25, 0.5])


def test_simpo_matches_hand_computed_value():
    """beta 2, gamma 0.5: beta * logp(y_w)/|y_w| = 2 * [-1/2, -3/4] = [-1, -1.5];
    beta * logp(y_l)/|y_l| = 2 * [-2/4, -1/2] = [-1, -1]; z = [0, -0.5] - 0.5 = [-0.5, -1];
    L = [log(1 + e^0.5), log(1 + e^1)]."""
    check(LOSSES["simpo"].fn(**batch(), beta=2.0, gamma=0.5),
          [softplus(0.5), softplus(1)], [-1.0, -1.5], [-1.0, -1.0])


def test_simpo_ignores_the_reference():
    """SimPO is reference-free: None references give the same result."""
    with_reference = LOSSES["simpo"].fn(**batch())
    without = LOSSES["simpo"].fn(**batch(reference_chosen_logps=None, reference_rejected_logps=None))
    for a, b in zip(with_reference, without):
        torch.testing.assert_close(a, b)


def test_ipo_matches_hand_computed_value():
    """tau 0.25: target 1/(2 tau) = 2; L = (Delta - 2)^2 = [0, 16]; rewards tau * r = [0.25, -0.25], [-0.25, 0.25]."""
    check(LOSSES["ipo"].fn(**batch(), tau=0.25), [0.0, 16.0], [0.25, -0.25], [-0.25, 0.25])


def test_slic_matches_hand_computed_value():
    """delta 1, lam 0.1: logp(y_w) - logp(y_l) = [1, -2]; hinge max(0, 1 - [1, -2]) = [0, 3];
    regulariser 0.1 * -logp(y_w) = [0.1, 0.3]; L = [0.1, 3.3]; rewards are the log-probs."""
    check(LOSSES["slic"].fn(**batch(), delta=1.0, lam=0.1), [0.1, 3.3], [-1.0, -3.0], [-2.0, -1.0])


def test_flexdpo_matches_hand_computed_value():
    """beta_chosen 1, beta_rejected 0.5: rewards [1, -1] and 0.5 * [-1, 1] = [-0.5, 0.5]; z = [1.5, -1.5];
    L = [log(1 + e^-1.5), log(1 + e^1.5)]."""
    check(LOSSES["flexdpo"].fn(**batch(), beta_chosen=1.0, beta_rejected=0.5),
          [softplus(-1.5), softplus(1.5)], [1.0, -1.0], [-0.5, 0.5])


def test_dpo_sft_matches_hand_computed_value():
    """beta 0.5, sft_weight 2: DPO part [log(1 + e^-1), log(1 + e)] as above; SFT part -logp(y_w)/|y_w|
    = [1/2, 3/4], times 2 = [1, 1.5]."""
    check(LOSSES["dpo_sft"].fn(**batch(), beta=0.5, sft_weight=2.0),
          [softplus(-1) + 1.0, softplus(1) + 1.5], [0.5, -0.5], [-0.5, 0.5])


def test_cdpo_matches_hand_computed_value():
    """beta 0.5, eps 0.25: z = [1, -1]; L = 0.75 * log(1 + e^-z) + 0.25 * log(1 + e^z)."""
    want = [0.75 * softplus(-1) + 0.25 * softplus(1), 0.75 * softplus(1) + 0.25 * softplus(-1)]
    check(LOSSES["cdpo"].fn(**batch(), beta=0.5, label_smoothing=0.25), want, [0.5, -0.5], [-0.5, 0.5])


def test_robust_matches_hand_computed_value():
    """beta 0.5, eps 0.25: z = [1, -1]; L = (0.75 * log(1 + e^-z) - 0.25 * log(1 + e^z)) / (1 - 0.5)."""
    want = [(0.75 * softplus(-1) - 0.25 * softplus(1)) / 0.5, (0.75 * softplus(1) - 0.25 * softplus(-1)) / 0.5]
    check(LOSSES["robust"].fn(**batch(), beta=0.5, label_smoothing=0.25), want, [0.5, -0.5], [-0.5, 0.5])


def test_hinge_matches_hand_computed_value():
    """beta 0.5: beta * Delta = [1, -1]; L = max(0, 1 - [1, -1]) = [0, 2]."""
    check(LOSSES["hinge"].fn(**batch(), beta=0.5), [0.0, 2.0], [0.5, -0.5], [-0.5, 0.5])


def test_sft_loss_is_mean_nll_per_response_token():
    """-(-1 - 3) / (2 + 4) = 4/6: a token-weighted mean, not a mean of per-sequence means (5/8)."""
    got = sft_loss(policy_logps=torch.tensor([-1.0, -3.0]), lengths=torch.tensor([2, 4]))
    torch.testing.assert_close(got, torch.tensor(4 / 6))


def test_bradley_terry_loss_matches_hand_computed_value():
    """scores (1, 0) and (0, 1): L = -log sigma([1, -1]) = [log(1 + e^-1), log(1 + e)]."""
    got = bradley_terry_loss(chosen_scores=torch.tensor([1.0, 0.0]), rejected_scores=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(got, torch.tensor([softplus(-1), softplus(1)]))


# 2. Exact reductions.

@pytest.mark.parametrize("name, hyperparameters, the_batch", [
    ("ilrdpo", {"beta": 0.5, "alpha": 0.0}, batch()),
    ("flexdpo", {"beta_chosen": 0.5, "beta_rejected": 0.5}, batch()),
    ("dpo_sft", {"beta": 0.5, "sft_weight": 0.0}, batch()),
    ("lndpo", {"beta": 0.5}, batch(chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2))),
    ("cdpo", {"beta": 0.5, "label_smoothing": 0.0}, batch()),
    ("robust", {"beta": 0.5, "label_smoothing": 0.0}, batch()),
], ids=["ilrdpo_alpha_0", "flexdpo_equal_betas", "dpo_sft_weight_0", "lndpo_lengths_1", "cdpo_eps_0", "robust_eps_0"])
def test_variant_reduces_exactly_to_dpo(name, hyperparameters, the_batch):
    want = LOSSES["dpo"].fn(**the_batch, beta=0.5)
    for got, expected in zip(LOSSES[name].fn(**the_batch, **hyperparameters), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# 3. Gradient directions.

@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_falls_as_chosen_rises_and_rejected_falls(name):
    """At default hyperparameters, with logp(y_w) = [-3, -4] and logp(y_l) = [-1, -1] so that every pair is
    misranked and every hinge active (Delta = [-1, -3]): dL/dlogp(y_w) < 0 and dL/dlogp(y_l) > 0."""
    chosen = torch.tensor([-3.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -1.0], requires_grad=True)
    losses, _, _ = LOSSES[name].fn(**batch(policy_chosen_logps=chosen, policy_rejected_logps=rejected))
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def chosen_gradient(name: str, chosen_lengths: list[int], rejected_lengths: list[int]) -> float:
    """|dL/dlogp(y_w)| at Delta = 0, beta 0.1, alpha 0.1 for ilrdpo."""
    chosen = torch.tensor([-5.0], requires_grad=True)
    hyperparameters = {"beta": 0.1} | ({"alpha": 0.1} if name == "ilrdpo" else {})
    losses, _, _ = LOSSES[name].fn(
        policy_chosen_logps=chosen, policy_rejected_logps=torch.tensor([-5.0]),
        reference_chosen_logps=torch.tensor([-5.0]), reference_rejected_logps=torch.tensor([-5.0]),
        chosen_lengths=torch.tensor(chosen_lengths), rejected_lengths=torch.tensor(rejected_lengths),
        **hyperparameters)
    losses.sum().backward()
    return chosen.grad.abs().item()


def test_ilrdpo_pushes_less_when_the_chosen_is_longer():
    """|y_w| - |y_l| = +10: |dL/dlogp(y_w)| = 0.1 * sigma(-1) ≈ 0.0269 < dpo's 0.1 * sigma(0) = 0.05."""
    got = chosen_gradient("ilrdpo", [20], [10])
    assert got == pytest.approx(0.1 / (1 + math.e), rel=1e-5)
    assert got < chosen_gradient("dpo", [20], [10])


def test_ilrdpo_pushes_more_when_the_chosen_is_shorter():
    """|y_w| - |y_l| = -10: |dL/dlogp(y_w)| = 0.1 * sigma(1) ≈ 0.0731 > dpo's 0.05."""
    got = chosen_gradient("ilrdpo", [10], [20])
    assert got == pytest.approx(0.1 * math.e / (1 + math.e), rel=1e-5)
    assert got > chosen_gradient("dpo", [10], [20])


def expected_length_after_training(name: str, hyperparameters: dict[str, float],
                                   steps: int = 300) -> tuple[float, float]:
    """A categorical policy over 6 candidate responses (logits are the parameters, uniform at the start,
    the reference is the start). Labels come from a reward that prefers longer responses,
    R(y) = quality(y) + 0.05 * |y|, through Bradley-Terry: every ordered pair (a, b) of candidates is a
    training pair weighted by P(a > b) = sigma(R(a) - R(b)), so the data are exact and no sampling is
    needed. Returns the expected length under the initial and under the trained policy."""
    lengths = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    quality = torch.tensor([0.5, 0.0, 1.0, -0.5, 0.2, 0.1])
    reward = quality + 0.05 * lengths
    a, b = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    a, b = a[a != b], b[a != b]
    weight = torch.sigmoid(reward[a] - reward[b])
    logits = torch.zeros(6, requires_grad=True)
    reference = torch.log_softmax(logits.detach(), -1)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        logp = torch.log_softmax(logits, -1)
        losses, _, _ = LOSSES[name].fn(
            policy_chosen_logps=logp[a], policy_rejected_logps=logp[b],
            reference_chosen_logps=reference[a], reference_rejected_logps=reference[b],
            chosen_lengths=lengths[a], rejected_lengths=lengths[b], **hyperparameters)
        opt.zero_grad()
        ((weight * losses).sum() / weight.sum()).backward()
        opt.step()
    final = torch.softmax(logits.detach(), -1)
    return lengths.mean().item(), (final * lengths).sum().item()


def test_ilrdpo_trains_a_shorter_policy_than_dpo_on_length_biased_pairs():
    """The DPO optimum is pi ∝ pi_ref * exp(R / beta), which favours the long responses; iLR-DPO's is
    pi ∝ pi_ref * exp((R - alpha * |y|) / beta). Same data, steps and learning rate for both."""
    start, dpo_length = expected_length_after_training("dpo", {"beta": 0.1})
    _, ilrdpo_length = expected_length_after_training("ilrdpo", {"beta": 0.1, "alpha": 0.03})
    assert dpo_length > start + 10  # the labels are length-biased: DPO lengthens
    assert ilrdpo_length < dpo_length - 10


# The registry contract.

@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_takes_the_six_tensors_and_returns_three_float32_vectors(name):
    """bf16 inputs, B = 3: three finite float32 tensors of shape [3]."""
    g = torch.Generator().manual_seed(0)
    logps = {key: (-10 * torch.rand(3, generator=g)).bfloat16() for key in (
        "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")}
    out = LOSSES[name].fn(**logps, chosen_lengths=torch.tensor([3, 7, 12]), rejected_lengths=torch.tensor([5, 1, 9]))
    assert len(out) == 3
    for t in out:
        assert t.dtype == torch.float32 and t.shape == (3,) and torch.isfinite(t).all()


@pytest.mark.parametrize("name", [name for name, loss in LOSSES.items() if loss.reference_free])
def test_reference_free_losses_run_without_reference_logps(name):
    losses, _, _ = LOSSES[name].fn(**batch(reference_chosen_logps=None, reference_rejected_logps=None))
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("name", [name for name, loss in LOSSES.items() if not loss.reference_free])
def test_reference_losses_refuse_missing_reference_logps(name):
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        LOSSES[name].fn(**batch(reference_chosen_logps=None, reference_rejected_logps=None))


def test_rewards_stay_attached_to_the_graph():
    """The caller detaches for logging; the loss does not."""
    chosen = torch.tensor([-1.0, -3.0], requires_grad=True)
    _, chosen_rewards, rejected_rewards = LOSSES["dpo"].fn(**batch(policy_chosen_logps=chosen))
    assert chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_loss_hyperparameters_lists_the_keyword_defaults():
    assert loss_hyperparameters("dpo") == {"beta": 0.1}
    assert loss_hyperparameters("ilrdpo") == {"beta": 0.1, "alpha": 0.01}
    assert loss_hyperparameters("simpo") == {"beta": 2.0, "gamma": 1.0}
    assert loss_hyperparameters("robust") == {"beta": 0.1, "label_smoothing": 0.1}


def test_loss_hyperparameters_rejects_an_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'dpp'"):
        loss_hyperparameters("dpp")


# 5. Bad hyperparameters and lengths.

@pytest.mark.parametrize("name, hyperparameters, parameter", [
    ("dpo", {"beta": -0.1}, "beta"),
    ("dpo", {"beta": 0.0}, "beta"),
    ("ilrdpo", {"alpha": -0.01}, "alpha"),
    ("simpo", {"beta": -2.0}, "beta"),
    ("ipo", {"tau": 0.0}, "tau"),
    ("flexdpo", {"beta_rejected": -0.05}, "beta_rejected"),
    ("cdpo", {"label_smoothing": 0.5}, "label_smoothing"),
    ("robust", {"label_smoothing": 0.5}, "label_smoothing"),
    ("robust", {"label_smoothing": -0.1}, "label_smoothing"),
    ("dpo", {"beta": float("nan")}, "beta"),
])
def test_bad_hyperparameter_raises_value_error_naming_it(name, hyperparameters, parameter):
    with pytest.raises(ValueError, match=parameter):
        LOSSES[name].fn(**batch(), **hyperparameters)


@pytest.mark.parametrize("name", ["ilrdpo", "lndpo", "simpo", "dpo_sft"])
def test_zero_length_raises_value_error(name):
    with pytest.raises(ValueError, match="lengths"):
        LOSSES[name].fn(**batch(chosen_lengths=torch.tensor([2, 0])))


def test_sft_loss_zero_length_raises_value_error():
    with pytest.raises(ValueError, match="lengths"):
        sft_loss(policy_logps=torch.tensor([-1.0]), lengths=torch.tensor([0]))
