"""Preference losses: one plain function per objective, the registry at the bottom.

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
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

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


def dpo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
        reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1):
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290, eq. 7):

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
    """Length-normalised DPO, "The Hitchhiker's Guide to Human Alignment with *PO" (PAPERS.md section 2):

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
    """IPO, Azar et al. 2023 (arXiv 2310.12036), on summed log-probs as in PAPERS.md:

        L = (Delta - 1/(2 * tau))^2             rewards: tau * r(y_w), tau * r(y_l)

    The rewards use tau as DPO's use beta (both weigh the KL term), so their margin aims at 1/2.
    tau 0.1 is our default (PAPERS.md gives none; TRL's beta default for its IPO loss).
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

    sft_weight 1.0 is our default (PAPERS.md gives none).
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _check(sft_weight >= 0, f"sft_weight must be >= 0, got {sft_weight}")
    r_w, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    l_w, _ = _lengths(chosen_lengths, rejected_lengths)
    chosen, rejected = beta * r_w, beta * r_l
    sft = -policy_chosen_logps.float() / l_w
    return -F.logsigmoid(chosen - rejected) + sft_weight * sft, chosen, rejected


def cdpo(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
         reference_rejected_logps=None, chosen_lengths, rejected_lengths, beta: float = 0.1,
         label_smoothing: float = 0.1):
    """Conservative DPO, Mitchell 2023 ("A note on DPO with noisy preferences"): labels flipped with
    probability eps = label_smoothing, trained on the expected label:

        L = -(1 - eps) * log sigma(beta * Delta) - eps * log sigma(-beta * Delta)    rewards: as DPO

    eps 0.1 is our default (PAPERS.md gives none); eps = 0 is DPO.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _check(0 <= label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
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

    Unlike cDPO it is not bounded below. eps 0.1 is our default (PAPERS.md gives none); eps = 0 is DPO.
    """
    _check(beta > 0, f"beta must be > 0, got {beta}")
    _check(0 <= label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
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


def sft_loss(*, policy_logps, lengths):
    """Token-level SFT objective: the mean negative log-likelihood per response token over the batch,

        L = -sum_i logp(y_i) / sum_i |y_i|      policy_logps, lengths: [B]; returns a float32 scalar
    """
    _check(bool(lengths.min() > 0), "lengths must be > 0 (response tokens, EOS included)")
    return -policy_logps.float().sum() / lengths.float().sum()


def bradley_terry_loss(*, chosen_scores, rejected_scores):
    """The reward model's Bradley-Terry loss, per pair: L = -log sigma(R(y_w) - R(y_l)); [B] -> [B] float32."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())


@dataclass(frozen=True)
class Loss:
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    reference_free: bool  # True: the caller may skip the reference model and pass None for its log-probs


LOSSES: dict[str, Loss] = {
    "dpo": Loss(dpo, reference_free=False),
    "ilrdpo": Loss(ilrdpo, reference_free=False),
    "lndpo": Loss(lndpo, reference_free=False),
    "simpo": Loss(simpo, reference_free=True),
    "ipo": Loss(ipo, reference_free=False),
    "slic": Loss(slic, reference_free=True),
    "flexdpo": Loss(flexdpo, reference_free=False),
    "dpo_sft": Loss(dpo_sft, reference_free=False),
    "cdpo": Loss(cdpo, reference_free=False),
    "robust": Loss(robust, reference_free=False),
    "hinge": Loss(hinge, reference_free=False),
}

TENSOR_KEYWORDS = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                   "reference_rejected_logps", "chosen_lengths", "rejected_lengths")


def loss_hyperparameters(name: str) -> dict[str, float]:
    """The hyperparameters of LOSSES[name] and their defaults, e.g. {"beta": 0.1, "alpha": 0.01}."""
    _check(name in LOSSES, f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    parameters = inspect.signature(LOSSES[name].fn).parameters.values()
    return {p.name: p.default for p in parameters
            if p.name not in TENSOR_KEYWORDS and p.default is not inspect.Parameter.empty}
