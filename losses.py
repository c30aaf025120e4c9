"""Preference losses: one plain function per objective, the options that change their inputs, the registry.

Every preference loss takes the same six keyword tensors, each of shape [B]:

    policy_chosen_logps, policy_rejected_logps        logp(y_w), logp(y_l): summed over response tokens
    reference_chosen_logps, reference_rejected_logps  the same under the frozen reference model
                                                      (None for the reference-free losses)
    chosen_lengths, rejected_lengths                  |y_w|, |y_l|: response tokens, EOS included

then its own hyperparameters as keyword-only floats with defaults (`loss_hyperparameters` lists them,
the trainer turns them into flags). A loss ignores the tensors it does not use, so the caller calls every
loss the same way. It returns `(losses, chosen_rewards, rejected_rewards)`, each [B] float32 and still
attached to the graph: the per-pair loss and the two implicit rewards that the loss compares, so the
trainer logs rewards, margins and accuracies alike for every loss. Margins added to the comparison
(SimPO's gamma, iLR-DPO's alpha * (|y_w| - |y_l|), IPO's target 1/(2 tau)) are not part of the rewards.

Notation (PAPERS.md): r(y) = logp(y) - ref_logp(y), Delta = r(y_w) - r(y_l), sigma the logistic
sigmoid. The math runs in float32 whatever the input dtype, and log sigma is always F.logsigmoid.

What the trainer minimises is an `Objective`: one registered loss, or a weighted sum of several (a
mixture, e.g. MPO's sigmoid + bco_pair + sft), each with its hyperparameters, plus options that change
what every loss receives or how its per-pair values count:

    ld_alpha        LD-DPO: logp(y) = logp(first l_p tokens) + ld_alpha * logp(the rest), l_p = min(|y_w|, |y_l|)
    sampo           SamPO: logp(y) summed over a random l_p of its tokens (the longer response down-sampled)
    use_weighting   WPO: each pair's loss times the policy's w(y_w) * w(y_l)
    f_divergence    f-DPO: every r(y) replaced by f'(pi/pi_ref) of the chosen divergence

A loss never sees per-token values: the options that need them turn them into the per-sequence log-probs
above (LD-DPO and SamPO, for the policy and the reference alike) or into per-pair weights (WPO) before any
loss runs, so adding a loss stays one function and one registry entry. The registry's `Loss` says what
each loss needs and which options it admits; `Objective.needs` sums that up for the trainer:

    "reference"         reference log-probs (some loss is not reference-free)
    "policy_tokens"     the policy's log-probs per token, [B, T], instead of their sums
    "reference_tokens"  the reference's per token too (so its cache must hold them per token)
    "log_sum_sq_probs"  per token, log sum_v pi(v | x, y_<t)^2 under the policy, [B, T], without gradient (WPO)
    "pair_seeds"        one int64 per pair, [B] (SamPO's draw: the same pair and seed draw the same tokens
                        whatever else is in the batch, on any number of processes, after any resume)

and the trainer calls `objective_losses(objective, **tensors)`. A per-token tensor is [B, T] float: column t
holds the response's t-th token (EOS included), T is at least the batch's longest response, and columns
from a row's length on are ignored. What `needs` does not ask for per token may come as [B] sums (a per-token
tensor is summed). It returns a `PairLosses`: the objective's per-pair loss [B], whose mean over pairs is
the training loss, the first loss's rewards for logging, and each loss's own per-pair values.
"""

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _check(ok: bool, message: str) -> None:
    if not ok:  # `not ok` also catches NaN hyperparameters
        raise ValueError(message)


def _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    """r(y_w), r(y_l) in float32, each [B]."""
    _check(reference_chosen_logps is not None and reference_rejected_logps is not None,
           "this loss needs reference_chosen_logps and reference_rejected_logps")
    return (policy_chosen_logps.float() - reference_chosen_logps.float(),
            policy_rejected_logps.float() - reference_rejected_logps.float())


def _lengths(chosen_lengths, rejected_lengths):
    """|y_w|, |y_l| in float32, each [B]; every length must be positive."""
    _check(bool(chosen_lengths.min() > 0) and bool(rejected_lengths.min() > 0),
           "chosen_lengths and rejected_lengths must be > 0 (response tokens, EOS included)")
    return chosen_lengths.float(), rejected_lengths.float()


def _label_smoothing(eps: float, low_open: bool = False) -> None:
    ok = (0 < eps if low_open else 0 <= eps) and eps < 0.5
    _check(ok, f"label_smoothing must be in {'(' if low_open else '['}0, 0.5), got {eps}")


def dpo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
        reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1):
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290, eq. 7); TRL's `sigmoid`:

        L = -log sigma(beta * Delta)            rewards: beta * r(y_w), beta * r(y_l)

    beta 0.1: PAPERS.md's default and the usual DPO choice.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def ilrdpo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
           reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1,
           alpha: float = 0.01):
    """iLR-DPO, Liu et al. 2024 (arXiv 2406.11817); the length margin of R-DPO (arXiv 2403.19159):

        L = -log sigma(beta * Delta + alpha * (|y_w| - |y_l|))    rewards: beta * r(y_w), beta * r(y_l)

    The sign is a plus: the labeller's reward is modelled as R(y) = beta * r(y) + alpha * |y| + const, so
    the policy learns R minus a length penalty, pi(y) ∝ pi_ref(y) * exp((R(y) - alpha * |y|) / beta).
    A pair whose chosen response is the longer one is partly explained by length and pushes the policy
    less; one whose chosen response is the shorter one pushes it more. alpha = 0 is DPO.
    alpha 0.01 is our default, not the paper's (PAPERS.md gives none): the policy targets R(y) - alpha * |y|,
    so 0.01 charges one unit of the labeller's reward (a Bradley-Terry logit) per 100 tokens. Tune it to
    the reward model's scale.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _check(alpha >= 0, f"alpha must be >= 0 (it is a length penalty), got {alpha}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    l_w, l_l = _lengths(chosen_lengths, rejected_lengths)
    chosen, rejected = beta * r_w, beta * r_l
    return -F.logsigmoid(chosen - rejected + alpha * (l_w - l_l)), chosen, rejected


def lndpo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
          reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 2.0):
    """Length-normalised DPO, "The Hitchhiker's Guide to Human Alignment with *PO" (PAPERS.md section 2);
    TRL's `sigmoid_norm`:

        L = -log sigma(beta * (r(y_w)/|y_w| - r(y_l)/|y_l|))    rewards: beta * r(y)/|y|

    beta 2.0 is our default (PAPERS.md gives none): a per-token log-ratio is about |y| times smaller than
    a sequence one, so beta must be far larger than DPO's 0.1; 2.0 is SimPO's scale for per-token rewards.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    l_w, l_l = _lengths(chosen_lengths, rejected_lengths)
    chosen, rejected = beta * r_w / l_w, beta * r_l / l_l
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def simpo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
          reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 2.0,
          gamma: float = 1.0):
    """SimPO, Meng et al. 2024 (arXiv 2405.14734), reference-free:

        L = -log sigma(beta * (logp(y_w)/|y_w| - logp(y_l)/|y_l|) - gamma)    rewards: beta * logp(y)/|y|

    gamma is the absolute target margin (not SimPO's gamma/beta ratio). Defaults: beta 2.0 and
    gamma/beta 0.5, i.e. gamma 1.0, SimPO's Llama-3-8B-Base recipe.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _check(gamma >= 0, f"gamma must be >= 0, got {gamma}")
    l_w, l_l = _lengths(chosen_lengths, rejected_lengths)
    chosen, rejected = beta * policy_chosen_logps.float() / l_w, beta * policy_rejected_logps.float() / l_l
    return -F.logsigmoid(chosen - rejected - gamma), chosen, rejected


def ipo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
        reference_rejected_logps=None, chosen_lengths, rejected_lengths, tau: float = 0.1):
    """IPO, Azar et al. 2023 (arXiv 2310.12036, eq. 17), per token as TRL computes it:

        L = (r(y_w)/|y_w| - r(y_l)/|y_l| - 1/(2 * tau))^2      rewards: tau * r(y)/|y|

    `ipo` is this per-token form, which TRL says the IPO authors confirmed their reported results used;
    `ipo_sum` is the equation as printed, on summed log-ratios. The rewards use tau as DPO's use beta.
    tau 0.1 is our default (PAPERS.md gives none; TRL's beta default, which is its IPO tau).
    """
    _check(tau > 0, f"tau must be > 0, got {tau}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    l_w, l_l = _lengths(chosen_lengths, rejected_lengths)
    return (r_w / l_w - r_l / l_l - 1 / (2 * tau)) ** 2, tau * r_w / l_w, tau * r_l / l_l


def ipo_sum(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
            reference_rejected_logps=None, chosen_lengths, rejected_lengths, tau: float = 0.1):
    """IPO as printed in Azar et al. 2023 (arXiv 2310.12036, eq. 17), on summed log-ratios (PAPERS.md):

        L = (Delta - 1/(2 * tau))^2             rewards: tau * r(y_w), tau * r(y_l)

    The rewards use tau as DPO's use beta (both weigh the KL term), so their margin aims at 1/2.
    tau 0.1 is our default (PAPERS.md gives none). `ipo` is the per-token form.
    """
    _check(tau > 0, f"tau must be > 0, got {tau}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (r_w - r_l - 1 / (2 * tau)) ** 2, tau * r_w, tau * r_l


def slic(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
         reference_rejected_logps=None, chosen_lengths, rejected_lengths, delta: float = 1.0,
         lam: float = 0.1):
    """SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425), reference-free: rank calibration plus a regulariser

        L = max(0, delta - logp(y_w) + logp(y_l)) + lam * (-logp(y_w))    rewards: logp(y_w), logp(y_l)

    Defaults are ours (PAPERS.md gives none): delta 1.0, a unit margin in nats; lam 0.1.
    """
    _check(delta >= 0, f"delta must be >= 0, got {delta}")
    _check(lam >= 0, f"lam must be >= 0, got {lam}")
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    return F.relu(delta - chosen + rejected) - lam * chosen, chosen, rejected


def flexdpo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
            reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta_chosen: float = 0.1,
            beta_rejected: float = 0.05):
    """DPO with separate betas, 3D-properties paper (arXiv 2406.07327):

        L = -log sigma(beta_chosen * r(y_w) - beta_rejected * r(y_l))
        rewards: beta_chosen * r(y_w), beta_rejected * r(y_l)

    beta_rejected < beta_chosen shrinks the gradient on the rejected response and slows the drastic drop
    of its likelihood. Defaults are ours: DPO's 0.1 for the chosen, half of it for the rejected.
    """
    _check(beta_chosen > 0, f"beta_chosen must be > 0, got {beta_chosen}")
    _check(beta_rejected > 0, f"beta_rejected must be > 0, got {beta_rejected}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta_chosen * r_w, beta_rejected * r_l
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def dpo_sft(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
            reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1,
            sft_weight: float = 1.0):
    """DPO plus an SFT term on the chosen response, 3D-properties paper (arXiv 2406.07327):

        L = -log sigma(beta * Delta) + sft_weight * (-logp(y_w) / |y_w|)    rewards: as DPO

    sft_weight 1.0 is our default (PAPERS.md gives none). The mixture dpo + sft is TRL's form of the same
    idea (its SFT term a token mean over the batch, not a mean per response).
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _check(sft_weight >= 0, f"sft_weight must be >= 0, got {sft_weight}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    l_w, _ = _lengths(chosen_lengths, rejected_lengths)
    chosen, rejected = beta * r_w, beta * r_l
    sft_term = -policy_chosen_logps.float() / l_w
    return -F.logsigmoid(chosen - rejected) + sft_weight * sft_term, chosen, rejected


def cdpo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
         reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1,
         label_smoothing: float = 0.1):
    """Conservative DPO, Mitchell 2023 ("A note on DPO with noisy preferences"): labels flipped with
    probability eps = label_smoothing, trained on the expected label:

        L = -(1 - eps) * log sigma(beta * Delta) - eps * log sigma(-beta * Delta)    rewards: as DPO

    eps 0.1 is our default (PAPERS.md gives none); eps = 0 is DPO.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _label_smoothing(label_smoothing)
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    z, eps = chosen - rejected, label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), chosen, rejected


def robust(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
           reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1,
           label_smoothing: float = 0.1):
    """Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409): the unbiased loss under labels flipped with
    probability eps = label_smoothing:

        L = (-(1 - eps) * log sigma(beta * Delta) + eps * log sigma(-beta * Delta)) / (1 - 2 * eps)
        rewards: as DPO

    Unlike cDPO it is not bounded below. eps 0.1 is our default (the paper's typical value; TRL's default
    is 0); eps = 0 is DPO.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _label_smoothing(label_smoothing)
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    z, eps = chosen - rejected, label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), chosen, rejected


def hinge(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
          reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1):
    """Hinge loss on the DPO reward margin (RSO, Liu et al. 2023, arXiv 2309.06657):

        L = max(0, 1 - beta * Delta)            rewards: beta * r(y_w), beta * r(y_l)
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    return F.relu(1 - (chosen - rejected)), chosen, rejected


def exo_pair(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
             reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1,
             label_smoothing: float = 1e-3):
    """EXO, Ji et al. 2024 (arXiv 2402.00856, eq. 16), pairwise: the reverse KL from the model's preference
    q = (sigma(beta * Delta), sigma(-beta * Delta)) to the smoothed label p = (1 - eps, eps):

        L = q_w * (log q_w - log(1 - eps)) + q_l * (log q_l - log eps)    rewards: as DPO

    eps = label_smoothing must be > 0 (log eps); 1e-3 is the paper's recommendation and our default.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _label_smoothing(label_smoothing, low_open=True)
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    z, eps = chosen - rejected, label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))), chosen, rejected


def nca_pair(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
             reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1):
    """NCA, Chen et al. 2024 (arXiv 2402.05369), for pairs: each response's own reward is pushed, the chosen
    up and both away from the reference, so the chosen likelihood does not fall as it can under DPO:

        L = -log sigma(beta * r(y_w)) - 1/2 log sigma(-beta * r(y_w)) - 1/2 log sigma(-beta * r(y_l))
        rewards: beta * r(y_w), beta * r(y_l)
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected), chosen, rejected


def bco_pair(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
             reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1):
    """BCO, Jung et al. 2024 (arXiv 2404.04656), for pairs: a binary classifier with the implicit reward as
    its logit, chosen as positive and rejected as negative:

        L = -log sigma(beta * r(y_w)) - log sigma(-beta * r(y_l))    rewards: beta * r(y_w), beta * r(y_l)

    As in TRL 1.16, without the paper's reward shift delta (a running mean of the rewards).
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    return -F.logsigmoid(chosen) - F.logsigmoid(-rejected), chosen, rejected


def sppo_hard(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
              reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1):
    """SPPO, Wu et al. 2024 (arXiv 2405.00675, eq. 4.7) with hard win probabilities (1 for the chosen,
    0 for the rejected): each log-ratio regressed to +-1/(2 beta):

        L = (r(y_w) - 1/(2 beta))^2 + (r(y_l) + 1/(2 beta))^2      rewards: beta * r(y_w), beta * r(y_l)
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2, beta * r_w, beta * r_l


def _aot(differences, reference_differences, beta, label_smoothing):
    """The smoothed logistic loss on sorted(differences) - sorted(reference_differences), [B]."""
    delta = torch.sort(differences, dim=0).values - torch.sort(reference_differences, dim=0).values
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def aot(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
        reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1,
        label_smoothing: float = 0.0):
    """AOT, Melnyk et al. 2024 (arXiv 2406.05882), paired: first-order stochastic dominance of the policy's
    log-ratio margins over the reference's, through the sorted batch (the optimal transport in one dimension):

        d = sort_B(logp(y_w) - logp(y_l)) - sort_B(ref_logp(y_w) - ref_logp(y_l))
        L_i = -(1 - eps) log sigma(beta * d_i) - eps log sigma(-beta * d_i)    rewards: as DPO

    L_i belongs to the i-th quantile of the batch, not to pair i, so it depends on the batch the loss
    sees (a micro-batch in dpo.py) and per-pair weights (WPO) do not apply. eps 0, TRL's default.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _label_smoothing(label_smoothing)
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    differences = policy_chosen_logps.float() - policy_rejected_logps.float()
    return _aot(differences, differences - (r_w - r_l), beta, label_smoothing), beta * r_w, beta * r_l


def aot_unpaired(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
                 reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1,
                 label_smoothing: float = 0.0):
    """AOT, Melnyk et al. 2024 (arXiv 2406.05882), unpaired: the chosen log-ratios dominate the rejected ones
    as distributions over the batch:

        d = sort_B(r(y_w)) - sort_B(r(y_l))
        L_i = -(1 - eps) log sigma(beta * d_i) - eps log sigma(-beta * d_i)    rewards: as DPO

    As `aot`, L_i belongs to a quantile, not a pair. eps 0, TRL's default.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _label_smoothing(label_smoothing)
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return _aot(r_w, r_l, beta, label_smoothing), beta * r_w, beta * r_l


def apo_zero(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
             reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1):
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266, eq. 7), for chosen responses better than the
    model's own: the chosen likelihood goes up and the rejected down, each anchored at the reference:

        L = 1 - sigma(beta * r(y_w)) + sigma(beta * r(y_l))    rewards: beta * r(y_w), beta * r(y_l)
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    return 1 - torch.sigmoid(chosen) + torch.sigmoid(rejected), chosen, rejected


def apo_down(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
             reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1):
    """APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266, eq. 8), for chosen responses worse than the
    model's own: both likelihoods go down, the rejected one more:

        L = sigma(beta * r(y_w)) + 1 - sigma(beta * Delta)    rewards: beta * r(y_w), beta * r(y_l)
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    return torch.sigmoid(chosen) + 1 - torch.sigmoid(chosen - rejected), chosen, rejected


def discopop(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
             reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1,
             discopop_tau: float = 0.05):
    """DiscoPOP (log-ratio modulated loss), Lu et al. 2024 (arXiv 2406.08414, eq. 5): a blend of the
    logistic and the exponential loss, weighted by the margin itself:

        z = beta * Delta,  m = sigma(z / discopop_tau)
        L = (1 - m) * (-log sigma(z)) + m * exp(-z)            rewards: as DPO

    Not monotone in z near z = 0 (the paper notes the non-convexity). discopop_tau 0.05 is the paper's.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _check(discopop_tau > 0, f"discopop_tau must be > 0, got {discopop_tau}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * r_w, beta * r_l
    z = chosen - rejected
    m = torch.sigmoid(z / discopop_tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z), chosen, rejected


def sft(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
        reference_rejected_logps=None, chosen_lengths, rejected_lengths):
    """The SFT term on the chosen responses as TRL's `sft` loss type, for mixtures: the batch's mean
    negative log-likelihood per chosen token, the same for every pair,

        L_i = -sum_j logp(y_w,j) / sum_j |y_w,j|              rewards: logp(y_w), logp(y_l)

    so the mean over the pairs is that token mean (over the batch the loss sees: a micro-batch in dpo.py).
    """
    return (sft_loss(policy_logps=policy_chosen_logps, lengths=chosen_lengths).expand(len(policy_chosen_logps)),
            policy_chosen_logps.float(), policy_rejected_logps.float())


def sft_loss(*, policy_logps, lengths):
    """Token-level SFT objective: the mean negative log-likelihood per response token over the batch,

        L = -sum_i logp(y_i) / sum_i |y_i|      policy_logps, lengths: [B]; returns a float32 scalar
    """
    _check(bool(lengths.min() > 0), "lengths must be > 0 (response tokens, EOS included)")
    return -policy_logps.float().sum() / lengths.float().sum()


def bradley_terry_loss(*, chosen_scores, rejected_scores):
    """The reward model's Bradley-Terry loss, per pair: L = -log sigma(R(y_w) - R(y_l)); [B] -> [B] float32."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())


# Options: what LD-DPO and SamPO make of per-token log-probs, WPO's pair weights, f-DPO's log-ratios.

def _positions(lengths, width: int):
    """[B, width] bool: column t < lengths[b]."""
    return torch.arange(width, device=lengths.device) < lengths.unsqueeze(1)


def ld_token_weights(chosen_lengths, rejected_lengths, chosen_width: int, rejected_width: int, *, ld_alpha: float):
    """LD-DPO, Liu et al. 2024 (arXiv 2409.06411): each response's tokens weighted 1 up to the pair's shared
    length l_p = min(|y_w|, |y_l|) and ld_alpha after it, so that

        logp(y) = sum_{t <= l_p} logp(y_t) + ld_alpha * sum_{t > l_p} logp(y_t)

    for the policy and the reference alike. Returns ([B, chosen_width], [B, rejected_width]) float32;
    ld_alpha 1 is plain summing, 0 drops the longer response's tail.
    """
    shared = torch.minimum(chosen_lengths, rejected_lengths).unsqueeze(1)

    def weights(lengths, width):
        t = torch.arange(width, device=lengths.device)
        return torch.where(t < shared, 1.0, ld_alpha) * _positions(lengths, width)

    return weights(chosen_lengths, chosen_width), weights(rejected_lengths, rejected_width)


def sampo_token_weights(chosen_lengths, rejected_lengths, chosen_width: int, rejected_width: int, *, pair_seeds):
    """SamPO, Lu et al. 2024 (arXiv 2406.10957): the longer response of each pair keeps a uniformly random
    l_p = min(|y_w|, |y_l|) of its tokens (without replacement), the shorter all of its own, so that

        logp(y) = sum_{t in S(y)} logp(y_t),   |S(y_w)| = |S(y_l)| = l_p

    and r(y) sums the token log-ratios of the same tokens for policy and reference (as the paper writes it;
    the authors' code draws the reference's tokens separately). Pair b's draw comes from torch's CPU
    generator seeded with pair_seeds[b], so it depends on that seed and the two lengths only. Returns
    0/1 weights ([B, chosen_width], [B, rejected_width]) float32.
    """
    w_chosen = _positions(chosen_lengths, chosen_width).float()
    w_rejected = _positions(rejected_lengths, rejected_width).float()
    for b, (n_w, n_l, seed) in enumerate(zip(chosen_lengths.tolist(), rejected_lengths.tolist(), pair_seeds.tolist())):
        if n_w == n_l:
            continue
        longer, n, keep = (w_chosen, n_w, n_l) if n_w > n_l else (w_rejected, n_l, n_w)
        kept = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep]
        longer[b] = 0.0
        longer[b, kept.to(longer.device)] = 1.0
    return w_chosen, w_rejected


@torch.no_grad()
def wpo_weights(*, policy_chosen_logps, policy_rejected_logps, policy_chosen_log_sum_sq_probs,
                policy_rejected_log_sum_sq_probs, chosen_lengths, rejected_lengths):
    """WPO, Zhou et al. 2024 (arXiv 2406.11827, eq. 2, the aligned form TRL uses): each pair's weight is how
    likely the current policy is to produce both responses, per token and relative to its own confidence,

        w(y) = exp( (1/|y|) * sum_t [ logp(y_t) - log sum_v pi(v | x, y_<t)^2 ] ),   weight = w(y_w) * w(y_l)

    From per-token [B, T] policy log-probs and log sum of squared probabilities; [B] float32, no gradient.
    """
    def w(logps, log_sum_sq, lengths):
        mask = _positions(lengths, logps.shape[1])
        return torch.exp(((logps.float() - log_sum_sq.float()) * mask).sum(-1) / lengths.float())

    return (w(policy_chosen_logps, policy_chosen_log_sum_sq_probs, chosen_lengths)
            * w(policy_rejected_logps, policy_rejected_log_sum_sq_probs, rejected_lengths))


def _alpha_divergence(r, coef):
    if abs(coef - 1) < 1e-6:  # the limit alpha -> 1 is log u: reverse KL
        return r
    return (torch.exp(torch.clamp((coef - 1) * r, max=80.0)) - 1) / (coef - 1)  # 80: exp stays finite in float32


F_DIVERGENCES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "reverse_kl": lambda r, coef: r,                                     # f'(u) = log u: DPO
    "forward_kl": lambda r, coef: 1 - torch.exp(-r),                     # f'(u) = 1 - 1/u
    "js_divergence": lambda r, coef: math.log(2) + F.logsigmoid(r),      # f'(u) = log(2u / (1 + u))
    "alpha_divergence": _alpha_divergence,                               # f'(u) = (u^(alpha-1) - 1) / (alpha - 1)
}


def f_divergence_logratios(r, kind: str, coef: float = 0.5):
    """f-DPO, Wang et al. 2023 (arXiv 2309.16240): under the divergence f the implicit reward is
    beta * f'(u) with u = pi(y)/pi_ref(y) = exp(r(y)), so f'(u) takes r(y)'s place in the loss. [B] -> [B].
    The alpha-divergence is parameterised as TRL 1.16's (`coef` its f_alpha_divergence_coef).
    """
    return F_DIVERGENCES[kind](r.float(), coef)


# The registry, and what the trainer calls.

@dataclass(frozen=True)
class Loss:
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    reference_free: bool  # True: the caller may skip the reference model and pass None for its log-probs
    # Reads r(y_w), r(y_l) only through their difference, so an f-divergence may replace r(y) by f'(u)
    # (f-DPO's condition: the partition function cancels only there). TRL's list, and ours that qualify.
    accepts_f_divergence: bool = False
    # Reads the policy's own log-likelihood (an SFT term): LD-DPO, SamPO and f-divergences leave it alone.
    likelihood_term: bool = False
    sorts_batch: bool = False  # its L_i belongs to a quantile of the batch, not to pair i: no per-pair weights


LOSSES: dict[str, Loss] = {
    "dpo": Loss(dpo, reference_free=False, accepts_f_divergence=True),
    "ilrdpo": Loss(ilrdpo, reference_free=False, accepts_f_divergence=True),
    "lndpo": Loss(lndpo, reference_free=False, accepts_f_divergence=True),
    "simpo": Loss(simpo, reference_free=True),
    "ipo": Loss(ipo, reference_free=False, accepts_f_divergence=True),
    "ipo_sum": Loss(ipo_sum, reference_free=False, accepts_f_divergence=True),
    "slic": Loss(slic, reference_free=True),
    "flexdpo": Loss(flexdpo, reference_free=False),
    "dpo_sft": Loss(dpo_sft, reference_free=False),
    "cdpo": Loss(cdpo, reference_free=False, accepts_f_divergence=True),
    "robust": Loss(robust, reference_free=False, accepts_f_divergence=True),
    "hinge": Loss(hinge, reference_free=False, accepts_f_divergence=True),
    "exo_pair": Loss(exo_pair, reference_free=False, accepts_f_divergence=True),
    "nca_pair": Loss(nca_pair, reference_free=False),
    "bco_pair": Loss(bco_pair, reference_free=False),
    "sppo_hard": Loss(sppo_hard, reference_free=False),
    "aot": Loss(aot, reference_free=False, sorts_batch=True),
    "aot_unpaired": Loss(aot_unpaired, reference_free=False, sorts_batch=True),
    "apo_zero": Loss(apo_zero, reference_free=False),
    "apo_down": Loss(apo_down, reference_free=False),
    "discopop": Loss(discopop, reference_free=False, accepts_f_divergence=True),
    "sft": Loss(sft, reference_free=True, accepts_f_divergence=True, likelihood_term=True),
}
LOSSES["sigmoid"] = LOSSES["dpo"]  # TRL's names for two of ours
LOSSES["sigmoid_norm"] = LOSSES["lndpo"]

TENSOR_KEYWORDS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                   "reference_rejected_logps", "chosen_lengths", "rejected_lengths")


def loss_hyperparameters(name: str) -> dict[str, float]:
    """The hyperparameters of LOSSES[name] and their defaults, e.g. {"beta": 0.1, "alpha": 0.01}."""
    _check(name in LOSSES, f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    parameters = inspect.signature(LOSSES[name].fn).parameters.values()
    return {p.name: p.default for p in parameters
            if p.name not in TENSOR_KEYWORDS and p.default is not inspect.Parameter.empty}


@dataclass(frozen=True)
class Term:
    """One loss of an objective: LOSSES[name] with these hyperparameters (the rest at their defaults)."""
    name: str
    weight: float = 1.0
    hyperparameters: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """L = sum_k weight_k * L_k over the terms, each on the inputs the options make (module docstring).
    Checked when built: a ValueError names the first bad loss, hyperparameter, option or combination."""
    terms: tuple[Term, ...]
    ld_alpha: float | None = None    # LD-DPO's weight of the tokens past the shared length; None: off
    sampo: bool = False              # SamPO's down-sampling of the longer response
    use_weighting: bool = False      # WPO's per-pair weights
    f_divergence: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5  # alpha of the alpha_divergence

    def __post_init__(self):
        _check(len(self.terms) > 0, "an objective needs at least one loss")
        names = [t.name for t in self.terms]
        _check(len(set(names)) == len(names), f"a loss appears twice in the mixture {names}")
        for t in self.terms:
            own = loss_hyperparameters(t.name)
            _check(math.isfinite(t.weight) and t.weight > 0, f"the weight of loss {t.name!r} must be > 0, got {t.weight}")
            unknown = set(t.hyperparameters) - set(own)
            _check(not unknown, f"loss {t.name!r} has no hyperparameter {', '.join(sorted(unknown))} "
                                f"(it has: {', '.join(own) or 'none'})")
            LOSSES[t.name].fn(**_ONE_PAIR, **t.hyperparameters)  # its own checks, now rather than at step 1
        _check(self.ld_alpha is None or 0 <= self.ld_alpha <= 1, f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        _check(not (self.sampo and self.ld_alpha is not None), "ld_alpha and sampo both reweight tokens; choose one")
        _check(self.f_divergence in F_DIVERGENCES,
               f"unknown f_divergence {self.f_divergence!r}; known: {', '.join(F_DIVERGENCES)}")
        _check(math.isfinite(self.f_alpha_divergence_coef),
               f"f_alpha_divergence_coef must be finite, got {self.f_alpha_divergence_coef}")
        if self.f_divergence != "reverse_kl":
            refused = [n for n in names if not LOSSES[n].accepts_f_divergence]
            _check(not refused, f"f_divergence {self.f_divergence!r} applies only to losses that compare "
                                f"r(y_w) - r(y_l); not to {', '.join(refused)}")
        if self.use_weighting:
            refused = [n for n in names if LOSSES[n].sorts_batch]
            _check(not refused, f"use_weighting (WPO) weights pairs, and {', '.join(refused)} sorts them")

    @property
    def needs(self) -> frozenset[str]:
        """What objective_losses must be given beyond the policy's sums and the lengths (module docstring)."""
        needs = set()
        if not all(LOSSES[t.name].reference_free for t in self.terms):
            needs.add("reference")
        if self.ld_alpha is not None or self.sampo:
            needs |= {"policy_tokens", "reference_tokens"} if "reference" in needs else {"policy_tokens"}
        if self.use_weighting:
            needs |= {"policy_tokens", "log_sum_sq_probs"}
        if self.sampo:
            needs.add("pair_seeds")
        return frozenset(needs)


_ONE_PAIR = {k: torch.tensor([-1.0]) for k in TENSOR_KEYWORDS[:4]} | {
    "chosen_lengths": torch.tensor([1]), "rejected_lengths": torch.tensor([1])}


class PairLosses(NamedTuple):
    losses: torch.Tensor                   # [B] float32: sum_k weight_k * L_k per pair (times WPO's weight)
    chosen_rewards: torch.Tensor           # [B]: the first term's, for logging
    rejected_rewards: torch.Tensor
    components: dict[str, torch.Tensor]    # loss name -> its own L_k [B] (WPO-weighted, before weight_k)


def _sums(logps, lengths, weights=None):
    """[B] sums of [B] or [B, T] log-probs; a [B, T] tensor is masked to its lengths (and weighted)."""
    if logps is None:
        return None
    if logps.dim() == 1:
        _check(weights is None, "LD-DPO and SamPO need per-token log-probs ([B, T]), got per-sequence sums ([B])")
        return logps.float()
    _check(logps.shape[1] >= int(lengths.max()), f"per-token log-probs of width {logps.shape[1]} are narrower "
                                                 f"than the longest response ({int(lengths.max())} tokens)")
    mask = _positions(lengths, logps.shape[1]).float() if weights is None else weights
    return (logps.float() * mask).sum(-1)


def objective_losses(objective: Objective, *, policy_chosen_logps, policy_rejected_logps,
                     reference_chosen_logps=None, reference_rejected_logps=None, chosen_lengths, rejected_lengths,
                     policy_chosen_log_sum_sq_probs=None, policy_rejected_log_sum_sq_probs=None,
                     pair_seeds=None) -> PairLosses:
    """The objective on one batch of B pairs. Log-probs are [B] sums or [B, T] per token, as
    `objective.needs` asks (module docstring); the rest as the losses take them."""
    lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    tokens = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
              "reference_chosen_logps": reference_chosen_logps, "reference_rejected_logps": reference_rejected_logps}
    side = {k: chosen_lengths if "chosen" in k else rejected_lengths for k in tokens}
    plain = {k: _sums(v, side[k]) for k, v in tokens.items()}
    inputs = plain
    if objective.ld_alpha is not None or objective.sampo:
        _check(policy_chosen_logps.dim() == 2 and policy_rejected_logps.dim() == 2,
               "LD-DPO and SamPO need per-token log-probs ([B, T])")
        widths = policy_chosen_logps.shape[1], policy_rejected_logps.shape[1]
        if objective.sampo:
            _check(pair_seeds is not None, "SamPO needs pair_seeds")
            w_chosen, w_rejected = sampo_token_weights(chosen_lengths, rejected_lengths, *widths, pair_seeds=pair_seeds)
        else:
            w_chosen, w_rejected = ld_token_weights(chosen_lengths, rejected_lengths, *widths, ld_alpha=objective.ld_alpha)
        weights = {k: w_chosen if "chosen" in k else w_rejected for k in tokens}
        inputs = {k: _sums(v, side[k], weights[k]) for k, v in tokens.items()}
    if objective.f_divergence != "reverse_kl" and inputs["reference_chosen_logps"] is not None:
        # f'(u) takes r(y)'s place, passed as the policy's log-prob against a zero reference
        def f_prime(s):
            r = inputs[f"policy_{s}_logps"] - inputs[f"reference_{s}_logps"]
            return f_divergence_logratios(r, objective.f_divergence, objective.f_alpha_divergence_coef)

        zero = torch.zeros_like(inputs["reference_chosen_logps"])
        inputs = {"policy_chosen_logps": f_prime("chosen"), "policy_rejected_logps": f_prime("rejected"),
                  "reference_chosen_logps": zero, "reference_rejected_logps": zero}
    pair_weight = None
    if objective.use_weighting:
        _check(policy_chosen_log_sum_sq_probs is not None and policy_rejected_log_sum_sq_probs is not None,
               "WPO needs policy_chosen_log_sum_sq_probs and policy_rejected_log_sum_sq_probs")
        pair_weight = wpo_weights(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                                  policy_chosen_log_sum_sq_probs=policy_chosen_log_sum_sq_probs,
                                  policy_rejected_log_sum_sq_probs=policy_rejected_log_sum_sq_probs, **lengths)
    total, components, rewards = 0.0, {}, None
    for term in objective.terms:
        loss = LOSSES[term.name]
        losses, chosen, rejected = loss.fn(**(plain if loss.likelihood_term else inputs), **lengths,
                                           **term.hyperparameters)
        if pair_weight is not None:
            losses = losses * pair_weight
        components[term.name] = losses
        total = total + term.weight * losses
        rewards = rewards or (chosen, rejected)
    return PairLosses(total, *rewards, components)
