"""losses.py as a specification: hand-worked values, exact reductions, gradient directions, the length
effect of iLR-DPO on a tiny policy, the registry contract, objectives (mixtures, LD-DPO, SamPO, WPO,
f-divergences) on hand-made per-token values, and input validation (CPU, a few seconds). The same losses
against TRL's own code: tests/test_losses_trl.py.

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
from losses import (LOSSES, Objective, Term, bradley_terry_loss, loss_hyperparameters, objective_losses,  # noqa: E402
                    sampo_token_weights, sft_loss)


TENSOR_KEYS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")


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


def test_ipo_is_per_token_and_matches_hand_computed_value():
    """tau 0.25: target 1/(2 tau) = 2; r(y_w)/|y_w| = [1/2, -1/4], r(y_l)/|y_l| = [-1/4, 1/2], their
    difference [0.75, -0.75]; L = (0.75 - 2)^2, (-0.75 - 2)^2 = [1.5625, 7.5625];
    rewards tau * r/|y| = [0.125, -0.0625], [-0.0625, 0.125]."""
    check(LOSSES["ipo"].fn(**batch(), tau=0.25), [1.5625, 7.5625], [0.125, -0.0625], [-0.0625, 0.125])


def test_ipo_sum_matches_hand_computed_value():
    """tau 0.25: target 1/(2 tau) = 2; L = (Delta - 2)^2 = [0, 16]; rewards tau * r = [0.25, -0.25], [-0.25, 0.25]."""
    check(LOSSES["ipo_sum"].fn(**batch(), tau=0.25), [0.0, 16.0], [0.25, -0.25], [-0.25, 0.25])


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


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_exo_pair_matches_hand_computed_value():
    """beta 0.5, eps 0.25: z = beta * Delta = [1, -1]; q_w = sigma(z), log q_w = -log(1 + e^-z);
    L = q_w (log q_w - log 0.75) + q_l (log q_l - log 0.25) with q_l = sigma(-z)."""
    want = [sigmoid(z) * (-softplus(-z) - math.log(0.75)) + sigmoid(-z) * (-softplus(z) - math.log(0.25))
            for z in (1.0, -1.0)]
    check(LOSSES["exo_pair"].fn(**batch(), beta=0.5, label_smoothing=0.25), want, [0.5, -0.5], [-0.5, 0.5])


def test_nca_pair_matches_hand_computed_value():
    """beta 0.5: beta * r(y_w) = [0.5, -0.5], beta * r(y_l) = [-0.5, 0.5];
    L = log(1 + e^-c) + 0.5 log(1 + e^c) + 0.5 log(1 + e^l) for c, l those rewards."""
    want = [softplus(-c) + 0.5 * softplus(c) + 0.5 * softplus(l) for c, l in ((0.5, -0.5), (-0.5, 0.5))]
    check(LOSSES["nca_pair"].fn(**batch(), beta=0.5), want, [0.5, -0.5], [-0.5, 0.5])


def test_bco_pair_matches_hand_computed_value():
    """beta 0.5: L = log(1 + e^-c) + log(1 + e^l) = [2 log(1 + e^-0.5), 2 log(1 + e^0.5)]."""
    check(LOSSES["bco_pair"].fn(**batch(), beta=0.5), [2 * softplus(-0.5), 2 * softplus(0.5)],
          [0.5, -0.5], [-0.5, 0.5])


def test_sppo_hard_matches_hand_computed_value():
    """beta 0.5: targets +-1/(2 beta) = +-1; L = (r(y_w) - 1)^2 + (r(y_l) + 1)^2 = [0 + 0, 4 + 4]."""
    check(LOSSES["sppo_hard"].fn(**batch(), beta=0.5), [0.0, 8.0], [0.5, -0.5], [-0.5, 0.5])


def test_aot_compares_sorted_margins():
    """beta 0.5, eps 0: policy margins logp(y_w) - logp(y_l) = [1, -2], sorted [-2, 1]; reference margins
    [-1, 0], sorted [-1, 0]; d = [-1, 1]; L = [log(1 + e^0.5), log(1 + e^-0.5)] (quantiles, not pairs)."""
    check(LOSSES["aot"].fn(**batch(), beta=0.5), [softplus(0.5), softplus(-0.5)], [0.5, -0.5], [-0.5, 0.5])


def test_aot_unpaired_compares_sorted_log_ratios():
    """beta 0.5: r(y_w) = [1, -1] sorted [-1, 1], r(y_l) = [-1, 1] sorted [-1, 1]; d = [0, 0]; L = [log 2, log 2]
    although the pairs are ranked one right, one wrong: only the two distributions count."""
    check(LOSSES["aot_unpaired"].fn(**batch(), beta=0.5), [math.log(2)] * 2, [0.5, -0.5], [-0.5, 0.5])


def test_apo_zero_matches_hand_computed_value():
    """beta 0.5: L = 1 - sigma(c) + sigma(l) = [1 - sigma(0.5) + sigma(-0.5), 1 - sigma(-0.5) + sigma(0.5)]."""
    want = [1 - sigmoid(0.5) + sigmoid(-0.5), 1 - sigmoid(-0.5) + sigmoid(0.5)]
    check(LOSSES["apo_zero"].fn(**batch(), beta=0.5), want, [0.5, -0.5], [-0.5, 0.5])


def test_apo_down_matches_hand_computed_value():
    """beta 0.5: L = sigma(c) + 1 - sigma(beta * Delta) = [sigma(0.5) + 1 - sigma(1), sigma(-0.5) + 1 - sigma(-1)]."""
    want = [sigmoid(0.5) + 1 - sigmoid(1), sigmoid(-0.5) + 1 - sigmoid(-1)]
    check(LOSSES["apo_down"].fn(**batch(), beta=0.5), want, [0.5, -0.5], [-0.5, 0.5])


def test_discopop_matches_hand_computed_value():
    """beta 0.5, discopop_tau 0.5: z = [1, -1], m = sigma(z / 0.5) = sigma([2, -2]);
    L = (1 - m) log(1 + e^-z) + m e^-z."""
    want = [(1 - sigmoid(2 * z)) * softplus(-z) + sigmoid(2 * z) * math.exp(-z) for z in (1.0, -1.0)]
    check(LOSSES["discopop"].fn(**batch(), beta=0.5, discopop_tau=0.5), want, [0.5, -0.5], [-0.5, 0.5])


def test_sft_term_is_the_batch_token_mean_for_every_pair():
    """-(-1 - 3) / (2 + 4) = 4/6 for both pairs; rewards are the policy log-probs."""
    check(LOSSES["sft"].fn(**batch()), [4 / 6, 4 / 6], [-1.0, -3.0], [-2.0, -1.0])


def test_trl_names_are_aliases_of_ours():
    assert LOSSES["sigmoid"] is LOSSES["dpo"] and LOSSES["sigmoid_norm"] is LOSSES["lndpo"]


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

# Not here: sft never reads the rejected response; apo_down lowers the chosen likelihood on purpose;
# discopop is not monotone near a zero margin. Each has its own test below.
PAIRWISE = [name for name in LOSSES if name not in ("sft", "apo_down", "discopop")]


@pytest.mark.parametrize("name", PAIRWISE)
def test_loss_falls_as_chosen_rises_and_rejected_falls(name):
    """At default hyperparameters, with logp(y_w) = [-3, -4] and logp(y_l) = [-1, -1] so that every pair is
    misranked and every hinge active (Delta = [-1, -3]): dL/dlogp(y_w) < 0 and dL/dlogp(y_l) > 0."""
    chosen = torch.tensor([-3.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -1.0], requires_grad=True)
    losses, _, _ = LOSSES[name].fn(**batch(policy_chosen_logps=chosen, policy_rejected_logps=rejected))
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_apo_down_lowers_both_likelihoods_once_the_pair_is_ranked():
    """beta 0.1, r(y_w) = 0, r(y_l) = -20: dL/dr(y_w) = 0.1 * (sigma'(0) - sigma'(2)) = 0.1 * (0.25 - 0.105) > 0
    and dL/dr(y_l) = 0.1 * sigma'(2) > 0, so a gradient step lowers both."""
    chosen, rejected = torch.tensor([-5.0], requires_grad=True), torch.tensor([-25.0], requires_grad=True)
    losses, _, _ = LOSSES["apo_down"].fn(**batch(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                                                 reference_chosen_logps=torch.tensor([-5.0]),
                                                 reference_rejected_logps=torch.tensor([-5.0])))
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(0.1 * (0.25 - sigmoid(2) * sigmoid(-2)), rel=1e-5)
    assert rejected.grad.item() == pytest.approx(0.1 * sigmoid(2) * sigmoid(-2), rel=1e-5)


def test_discopop_is_not_monotone_near_a_zero_margin():
    """beta 1, tau 0.05: at z = -0.1 the blend weight m = sigma(-2) rises faster than the logistic part
    falls, so dL/dz > 0; at z = -1, m = sigma(-20) is ~0 and dL/dz ~ -sigma(1) < 0."""
    def slope(z):
        chosen = torch.tensor([z], requires_grad=True)
        zero = torch.tensor([0.0])
        losses, _, _ = LOSSES["discopop"].fn(policy_chosen_logps=chosen, policy_rejected_logps=zero,
                                             reference_chosen_logps=zero, reference_rejected_logps=zero,
                                             chosen_lengths=torch.tensor([1]), rejected_lengths=torch.tensor([1]),
                                             beta=1.0)
        losses.sum().backward()
        return chosen.grad.item()
    assert slope(-0.1) > 0 and slope(-1.0) == pytest.approx(-sigmoid(1), rel=1e-3)


def test_sft_term_pulls_every_chosen_token_alike_and_ignores_the_rejected():
    """L = -(logp(y_w,1) + logp(y_w,2)) / (|y_w,1| + |y_w,2|): dL/dlogp(y_w,i) = -1/6 for both pairs, and
    the rejected log-probs get no gradient."""
    chosen = torch.tensor([-1.0, -3.0], requires_grad=True)
    rejected = torch.tensor([-2.0, -1.0], requires_grad=True)
    losses, _, _ = LOSSES["sft"].fn(**batch(policy_chosen_logps=chosen, policy_rejected_logps=rejected))
    losses.mean().backward()
    torch.testing.assert_close(chosen.grad, torch.full((2,), -1 / 6))
    assert rejected.grad is None


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
    assert loss_hyperparameters("sigmoid") == {"beta": 0.1}
    assert loss_hyperparameters("exo_pair") == {"beta": 0.1, "label_smoothing": 1e-3}
    assert loss_hyperparameters("discopop") == {"beta": 0.1, "discopop_tau": 0.05}
    assert loss_hyperparameters("sft") == {}


def test_loss_hyperparameters_rejects_an_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'dpp'"):
        loss_hyperparameters("dpp")


# 5. Objectives: mixtures and the options (LD-DPO, SamPO, WPO, f-divergences).

def one(name: str, weight: float = 1.0, **hyperparameters) -> Term:
    return Term(name, weight, hyperparameters)


def test_an_objective_of_one_loss_is_that_loss():
    got = objective_losses(Objective((one("dpo", beta=0.5),)), **batch())
    want = LOSSES["dpo"].fn(**batch(), beta=0.5)
    for a, b in zip(got[:3], want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert list(got.components) == ["dpo"]


def test_a_mixture_is_the_weighted_sum_and_keeps_each_component():
    """0.8 * dpo(beta 0.5) + 2 * sft: dpo = [log(1 + e^-1), log(1 + e)], sft = [4/6, 4/6]; rewards are the
    first term's."""
    got = objective_losses(Objective((one("dpo", 0.8, beta=0.5), one("sft", 2.0))), **batch())
    dpo_part, sft_part = [softplus(-1), softplus(1)], [4 / 6, 4 / 6]
    check(got[:3], [0.8 * d + 2 * f for d, f in zip(dpo_part, sft_part)], [0.5, -0.5], [-0.5, 0.5])
    torch.testing.assert_close(got.components["dpo"], torch.tensor(dpo_part))
    torch.testing.assert_close(got.components["sft"], torch.tensor(sft_part))


def token_batch(**overrides) -> dict[str, torch.Tensor]:
    """One pair, per token ([1, T], zeros past each length): |y_w| = 3, |y_l| = 2.

        policy chosen  [-1, -2, -3]    reference chosen  [-1, -1, -1]
        policy rejected [-0.5, -0.5]   reference rejected [-1, -1]
    """
    tensors = {
        "policy_chosen_logps": torch.tensor([[-1.0, -2.0, -3.0]]),
        "reference_chosen_logps": torch.tensor([[-1.0, -1.0, -1.0]]),
        "policy_rejected_logps": torch.tensor([[-0.5, -0.5, 0.0]]),
        "reference_rejected_logps": torch.tensor([[-1.0, -1.0, 0.0]]),
        "chosen_lengths": torch.tensor([3]),
        "rejected_lengths": torch.tensor([2]),
    }
    return tensors | overrides


def test_ld_dpo_weighs_the_tokens_past_the_shared_length_by_ld_alpha():
    """ld_alpha 0.5, l_p = min(3, 2) = 2: logp(y_w) = -1 - 2 + 0.5 * -3 = -4.5, ref -1 - 1 + 0.5 * -1 = -2.5,
    r(y_w) = -2 (plain sums: -3); r(y_l) = -1 - -2 = 1; beta 0.5: L = log(1 + e^(0.5 * 3))."""
    got = objective_losses(Objective((one("dpo", beta=0.5),), ld_alpha=0.5), **token_batch())
    check(got[:3], [softplus(1.5)], [-1.0], [0.5])


def test_ld_dpo_with_ld_alpha_1_is_dpo_exactly():
    """Seeded per-token log-probs, B = 4: equal to dpo on their sums, bit for bit."""
    g = torch.Generator().manual_seed(0)
    lengths = {"chosen_lengths": torch.tensor([3, 5, 1, 4]), "rejected_lengths": torch.tensor([6, 2, 1, 4])}
    tokens = {}
    for key in TENSOR_KEYS:
        side = lengths["chosen_lengths" if "chosen" in key else "rejected_lengths"]
        tokens[key] = -3 * torch.rand(4, 6, generator=g) * (torch.arange(6) < side.unsqueeze(1))
    got = objective_losses(Objective((one("dpo", beta=0.3),), ld_alpha=1.0), **tokens, **lengths)
    want = LOSSES["dpo"].fn(**{k: v.sum(-1) for k, v in tokens.items()}, **lengths, beta=0.3)
    for a, b in zip(got[:3], want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ld_dpo_with_ld_alpha_0_ignores_the_longer_responses_tail():
    changed = token_batch(policy_chosen_logps=torch.tensor([[-1.0, -2.0, -9.0]]))
    objective = Objective((one("dpo"),), ld_alpha=0.0)
    torch.testing.assert_close(objective_losses(objective, **changed).losses,
                               objective_losses(objective, **token_batch()).losses)


def sampo_batch() -> dict[str, torch.Tensor]:
    """One pair: |y_w| = 4 with token log-ratios [0.2, 0.2, 0.2, 0.2] (policy [-1, -2, -0.5, -3], the reference
    0.2 below it), |y_l| = 2 with token log-ratios [0.5, -0.3]."""
    policy_chosen = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    return {"policy_chosen_logps": policy_chosen, "reference_chosen_logps": policy_chosen - 0.2,
            "policy_rejected_logps": torch.tensor([[-1.0, -1.0, 0.0, 0.0]]),
            "reference_rejected_logps": torch.tensor([[-1.5, -0.7, 0.0, 0.0]]),
            "chosen_lengths": torch.tensor([4]), "rejected_lengths": torch.tensor([2])}


@pytest.mark.parametrize("seed", [0, 1, 2, 12345])
def test_sampo_down_samples_the_longer_responses_token_log_ratios(seed):
    """SamPO keeps l_p = min(4, 2) = 2 of the chosen tokens, the same ones for policy and reference, so
    r(y_w) = 0.2 + 0.2 = 0.4 whichever two are drawn (all four: 0.8); r(y_l) = 0.5 - 0.3 = 0.2 in full;
    beta 1: L = log(1 + e^-(0.4 - 0.2)) (DPO on plain sums: log(1 + e^-0.6))."""
    got = objective_losses(Objective((one("dpo", beta=1.0),), sampo=True), **sampo_batch(),
                           pair_seeds=torch.tensor([seed]))
    check(got[:3], [softplus(-0.2)], [0.4], [0.2])


def test_sampo_draw_depends_only_on_the_pairs_seed_and_lengths():
    """Pair (5, 2, seed 7) keeps the same 2 tokens alone and in any batch position; another seed draws another
    subset (seeds 7 and 8 here); the shorter response and equal-length pairs keep every token."""
    alone, _ = sampo_token_weights(torch.tensor([5]), torch.tensor([2]), 6, 6, pair_seeds=torch.tensor([7]))
    w_chosen, w_rejected = sampo_token_weights(torch.tensor([3, 5, 4]), torch.tensor([3, 2, 6]), 6, 6,
                                               pair_seeds=torch.tensor([1, 7, 2]))
    assert torch.equal(w_chosen[1], alone[0]) and alone[0].sum() == 2 and alone[0, 5] == 0
    again, _ = sampo_token_weights(torch.tensor([5]), torch.tensor([2]), 6, 6, pair_seeds=torch.tensor([7]))
    other, _ = sampo_token_weights(torch.tensor([5]), torch.tensor([2]), 6, 6, pair_seeds=torch.tensor([8]))
    assert torch.equal(again, alone) and not torch.equal(other, alone)
    assert w_rejected[1].tolist() == [1, 1, 0, 0, 0, 0]
    assert w_chosen[0].tolist() == w_rejected[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert w_chosen[2].tolist() == [1, 1, 1, 1, 0, 0] and w_rejected[2].sum() == 4


def test_sampo_keeps_each_token_of_the_longer_response_with_probability_l_p_over_its_length():
    """3 of 6 tokens: over seeds 0..1999 each token is kept in 0.5 of the draws (binomial sd 0.011; bound 0.05)."""
    kept, _ = sampo_token_weights(torch.full((2000,), 6), torch.full((2000,), 3), 6, 3,
                                  pair_seeds=torch.arange(2000))
    assert (kept.sum(-1) == 3).all()
    assert ((kept.mean(0) - 0.5).abs() < 0.05).all()


def test_wpo_weighs_each_pair_by_the_policys_aligned_likelihood_of_both_responses():
    """chosen: logp [-1, -1], log sum_v p^2 [-0.5, -1.5]: mean(logp - that) = 0, w = 1; rejected: logp [-2],
    [-1]: w = e^-1. L = e^-1 * dpo(beta 1) with logp(y_w) = -2, ref 0; logp(y_l) = -2, ref 0: e^-1 * log 2.
    The weight carries no gradient: dL/dlogp(y_w, t) = e^-1 * -sigma(0) = -e^-1 / 2 at each token."""
    chosen = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    got = objective_losses(Objective((one("dpo", beta=1.0),), use_weighting=True),
                           policy_chosen_logps=chosen, policy_rejected_logps=torch.tensor([[-2.0, 0.0]]),
                           reference_chosen_logps=torch.tensor([0.0]), reference_rejected_logps=torch.tensor([0.0]),
                           chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([1]),
                           policy_chosen_log_sum_sq_probs=torch.tensor([[-0.5, -1.5]]),
                           policy_rejected_log_sum_sq_probs=torch.tensor([[-1.0, 0.0]]))
    torch.testing.assert_close(got.losses, torch.tensor([math.exp(-1) * math.log(2)]))
    got.losses.sum().backward()
    torch.testing.assert_close(chosen.grad, torch.full((1, 2), -math.exp(-1) / 2))


def test_forward_kl_replaces_each_log_ratio_by_one_minus_its_inverse_ratio():
    """f'(u) = 1 - 1/u at u = e^r: r(y_w) = [1, -1] -> [1 - e^-1, 1 - e], r(y_l) = [-1, 1] -> [1 - e, 1 - e^-1];
    beta 1: z = [e - e^-1, e^-1 - e]; L = log(1 + e^-z); rewards beta * f'(u)."""
    got = objective_losses(Objective((one("dpo", beta=1.0),), f_divergence="forward_kl"), **batch())
    z = math.e - 1 / math.e
    check(got[:3], [softplus(-z), softplus(z)], [1 - 1 / math.e, 1 - math.e], [1 - math.e, 1 - 1 / math.e])


@pytest.mark.parametrize("build, message", [
    (lambda: Objective((one("dpp"),)), "unknown loss 'dpp'"),
    (lambda: Objective(()), "at least one loss"),
    (lambda: Objective((one("dpo"), one("dpo"))), "twice"),
    (lambda: Objective((one("dpo", 0.0),)), "weight of loss 'dpo'"),
    (lambda: Objective((one("dpo", alpha=0.1),)), "loss 'dpo' has no hyperparameter alpha"),
    (lambda: Objective((one("dpo", beta=-1.0),)), "beta must be > 0"),
    (lambda: Objective((one("dpo"),), ld_alpha=1.5), "ld_alpha must be in"),
    (lambda: Objective((one("dpo"),), ld_alpha=0.5, sampo=True), "choose one"),
    (lambda: Objective((one("dpo"),), f_divergence="kl"), "unknown f_divergence 'kl'"),
    (lambda: Objective((one("dpo_sft"),), f_divergence="js_divergence"), "not to dpo_sft"),
])
def test_a_bad_objective_is_refused_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_token_options_refuse_per_sequence_sums():
    with pytest.raises(ValueError, match=r"per-token log-probs \(\[B, T\]\)"):
        objective_losses(Objective((one("dpo"),), ld_alpha=0.5), **batch())


@pytest.mark.parametrize("objective, needs", [
    (Objective((one("dpo"),)), {"reference"}),
    (Objective((one("simpo"),)), set()),
    (Objective((one("dpo"), one("sft"))), {"reference"}),
    (Objective((one("dpo"),), ld_alpha=0.5), {"reference", "policy_tokens", "reference_tokens"}),
    (Objective((one("simpo"),), sampo=True), {"policy_tokens", "pair_seeds"}),
    (Objective((one("dpo"),), use_weighting=True), {"reference", "policy_tokens", "log_sum_sq_probs"}),
    (Objective((one("dpo"),), f_divergence="js_divergence"), {"reference"}),
])
def test_needs_says_what_the_trainer_must_compute(objective, needs):
    assert objective.needs == needs


# 6. Bad hyperparameters and lengths.

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
    ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing"),
    ("aot", {"label_smoothing": 0.5}, "label_smoothing"),
    ("discopop", {"discopop_tau": 0.0}, "discopop_tau"),
    ("sppo_hard", {"beta": 0.0}, "beta"),
])
def test_bad_hyperparameter_raises_value_error_naming_it(name, hyperparameters, parameter):
    with pytest.raises(ValueError, match=parameter):
        LOSSES[name].fn(**batch(), **hyperparameters)


@pytest.mark.parametrize("name", ["ilrdpo", "lndpo", "simpo", "dpo_sft", "ipo", "sft"])
def test_zero_length_raises_value_error(name):
    with pytest.raises(ValueError, match="lengths"):
        LOSSES[name].fn(**batch(chosen_lengths=torch.tensor([2, 0])))


def test_sft_loss_zero_length_raises_value_error():
    with pytest.raises(ValueError, match="lengths"):
        sft_loss(policy_logps=torch.tensor([-1.0]), lengths=torch.tensor([0]))
