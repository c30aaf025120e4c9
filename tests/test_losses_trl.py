"""losses.py against TRL 1.16's own DPOTrainer code: every loss type, mixtures with loss_weights, LD-DPO's
ld_alpha, WPO's use_weighting and the four f-divergences give our value to 1e-6 (CPU, a few seconds).

How: TRL's loss is the method `DPOTrainer._compute_loss(self, model, inputs, return_outputs)`. It is called
unbound, on a stand-in `self` that holds the options as TRL's __init__ would set them, and with stand-in
policy and reference models whose forward returns fixed per-token log-probs (and, for WPO, log sum of
squared probabilities) in the layout TRL's fused LM head gives: one row per sequence, chosen rows then
rejected rows, zeros outside the completion. So TRL's own arithmetic runs from the log-probs on, on the
same numbers that `objective_losses` gets, and both losses and both gradients with respect to the policy's
per-token log-probs (at the response tokens; TRL's sum also runs over the zeros past them) are compared. The reference differs from the policy. Runs where TRL is installed
(the bench extra; CI installs it).
"""
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses import LOSSES, Objective, Term, objective_losses  # noqa: E402

trl = pytest.importorskip("trl")
if trl.__version__ != "1.16.0":
    pytest.skip(f"the oracle is TRL 1.16.0's code, found {trl.__version__}", allow_module_level=True)
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

TRL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
F_DIVERGENCE_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
CHOSEN_LENGTHS, REJECTED_LENGTHS = [3, 5, 1, 4], [6, 2, 1, 4]  # longer either side, equal, length 1


def token_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-token values, [B, T] with zeros past each length: log-probs in (-3, -0.05) for the policy, the
    reference the policy's plus noise, log sum of squared probabilities in (-2, 0) (all seeded)."""
    g = torch.Generator().manual_seed(seed)
    width = max(CHOSEN_LENGTHS + REJECTED_LENGTHS)
    out = {}
    for side, lengths in (("chosen", CHOSEN_LENGTHS), ("rejected", REJECTED_LENGTHS)):
        mask = torch.arange(width) < torch.tensor(lengths).unsqueeze(1)
        policy = -0.05 - 2.95 * torch.rand(len(lengths), width, generator=g)
        reference = (policy + 0.4 * torch.randn(len(lengths), width, generator=g)).clamp(max=-0.01)
        out[f"policy_{side}_logps"] = policy * mask
        out[f"reference_{side}_logps"] = reference * mask
        out[f"policy_{side}_log_sum_sq_probs"] = -2 * torch.rand(len(lengths), width, generator=g) * mask
    return out


class FixedLogps(torch.nn.Module):
    """Stands in for a model with TRL's fused LM head: returns the given per-token values."""
    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq_probs):
        super().__init__()
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, log_sum_sq_probs=self.log_sum_sq_probs, entropy=zeros,
                               mean_logits=zeros, is_top1=zeros.bool())


def trl_loss(t: dict, loss_type: list[str], loss_weights=None, beta=0.1, label_smoothing=0.0, discopop_tau=0.05,
             ld_alpha=None, use_weighting=False, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """TRL's scalar loss on the tensors of `t`. Each sequence is one prompt token then its completion."""
    lengths = CHOSEN_LENGTHS + REJECTED_LENGTHS
    width = max(lengths)
    completion_mask = torch.zeros(len(lengths), 1 + width, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion_mask[i, 1:1 + n] = 1
    attention_mask = completion_mask.clone()
    attention_mask[:, 0] = 1

    def rows(name):  # [2B, width]: the log-prob of completion token t at column t, as after TRL's shift
        return torch.cat([t[f"{name.format('chosen')}"], t[f"{name.format('rejected')}"]])

    policy = FixedLogps(rows("policy_{}_logps"), rows("policy_{}_log_sum_sq_probs"))
    reference = FixedLogps(rows("reference_{}_logps"), None)
    trainer = SimpleNamespace(
        model=policy, ref_model=reference, precompute_ref_logps=False, aux_loss_enabled=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        loss_types=loss_type, loss_weights=loss_weights or [1.0] * len(loss_type), beta=beta,
        label_smoothing=label_smoothing, ld_alpha=ld_alpha, use_weighting=use_weighting,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": attention_mask,
              "completion_mask": completion_mask}
    return DPOTrainer._compute_loss(trainer, policy, inputs, False)


HYPERPARAMETER_NAMES = {"beta": "beta", "label_smoothing": "label_smoothing", "discopop_tau": "discopop_tau",
                        "tau": "beta"}  # our IPO's tau is TRL's beta


def our_terms(loss_type: list[str], loss_weights, trl_hyper: dict) -> tuple[Term, ...]:
    """TRL's shared hyperparameters handed to each of our losses under its own names."""
    weights = loss_weights or [1.0] * len(loss_type)
    terms = []
    for name, weight in zip(loss_type, weights):
        own = {k: trl_hyper[v] for k, v in HYPERPARAMETER_NAMES.items()
               if k in LOSSES[name].fn.__kwdefaults__ and v in trl_hyper}
        terms.append(Term(name, weight, own))
    return tuple(terms)


def compare(loss_type: list[str], loss_weights=None, options: dict | None = None, **trl_hyper):
    """Our objective's mean per-pair loss and its gradient equal TRL's, to 1e-6."""
    options = options or {}
    trl_hyper = {"beta": 0.1, "label_smoothing": 0.0, "discopop_tau": 0.05} | trl_hyper  # TRL's defaults, to both
    trl_options = {"ld_alpha": options.get("ld_alpha"), "use_weighting": options.get("use_weighting", False),
                   "f_divergence_type": options.get("f_divergence", "reverse_kl"),
                   "f_alpha_divergence_coef": options.get("f_alpha_divergence_coef", 0.5)}
    theirs, ours = token_tensors(), token_tensors()
    for t in (theirs, ours):
        for side in ("chosen", "rejected"):
            t[f"policy_{side}_logps"].requires_grad_(True)
    expected = trl_loss(theirs, loss_type, loss_weights, **trl_hyper, **trl_options)
    expected.backward()
    objective = Objective(our_terms(loss_type, loss_weights, trl_hyper), **options)
    got = objective_losses(objective, **ours, chosen_lengths=torch.tensor(CHOSEN_LENGTHS),
                           rejected_lengths=torch.tensor(REJECTED_LENGTHS)).losses.mean()
    got.backward()
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    for side, lengths in (("chosen", CHOSEN_LENGTHS), ("rejected", REJECTED_LENGTHS)):
        inside = torch.arange(max(CHOSEN_LENGTHS + REJECTED_LENGTHS)) < torch.tensor(lengths).unsqueeze(1)
        # None: the tensor never reached the loss (sft alone does not read the rejected responses)
        ours_grad, theirs_grad = (torch.zeros(inside.shape) if t[f"policy_{side}_logps"].grad is None
                                  else t[f"policy_{side}_logps"].grad for t in (ours, theirs))
        torch.testing.assert_close(ours_grad[inside], theirs_grad[inside], rtol=1e-6, atol=1e-6)
    return got


def test_the_oracle_sees_a_reference_that_differs_from_the_policy():
    """DPO's loss at a reference equal to the policy is log 2 for every pair; here it is not."""
    assert abs(compare(["sigmoid"]).item() - 0.693147) > 1e-3


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_every_trl_loss_type_equals_trl(loss_type):
    """beta 0.5 (not the default, so that its use shows); label_smoothing 0.1 (exo_pair needs > 0, robust and
    aot use it); discopop_tau 0.5."""
    compare([loss_type], beta=0.5, label_smoothing=0.1, discopop_tau=0.5)


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_every_trl_loss_type_equals_trl_at_trl_defaults(loss_type):
    """TRL's defaults, given to our losses too: beta 0.1, discopop_tau 0.05; label_smoothing 0 except for
    exo_pair, which needs > 0: 1e-3."""
    compare([loss_type], label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0)


@pytest.mark.parametrize("loss_type, loss_weights", [
    (["sigmoid", "sft"], None),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO, TRL's example weights
    (["ipo", "hinge", "apo_zero"], [0.5, 2.0, 1.5]),
])
def test_mixtures_with_loss_weights_equal_trl(loss_type, loss_weights):
    compare(loss_type, loss_weights, beta=0.3)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("loss_type", [["sigmoid"], ["sigmoid_norm"], ["ipo"], ["aot"], ["sigmoid", "sft"]])
def test_ld_alpha_equals_trl(loss_type, ld_alpha):
    """LD-DPO reweights policy and reference tokens past the shared length; sft reads the plain log-probs."""
    compare(loss_type, options={"ld_alpha": ld_alpha}, beta=0.5)


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"], ["bco_pair"], ["sigmoid", "bco_pair"]])
def test_use_weighting_equals_trl(loss_type):
    """Not with sft: TRL 1.16 multiplies its expanded SFT tensor in place, and torch refuses (RuntimeError)."""
    compare(loss_type, options={"use_weighting": True}, beta=0.5)


def test_use_weighting_with_ld_alpha_equals_trl():
    compare(["sigmoid"], options={"use_weighting": True, "ld_alpha": 0.5}, beta=0.5)


@pytest.mark.parametrize("f_divergence, coef", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                                ("alpha_divergence", 0.5), ("alpha_divergence", 0.2),
                                                ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", [[name] for name in F_DIVERGENCE_LOSSES] + [["sigmoid", "sft"]])
def test_f_divergences_equal_trl(loss_type, f_divergence, coef):
    compare(loss_type, options={"f_divergence": f_divergence, "f_alpha_divergence_coef": coef}, beta=0.5,
            label_smoothing=0.1, discopop_tau=0.5)


def test_f_divergence_with_ld_alpha_equals_trl():
    compare(["sigmoid"], options={"f_divergence": "js_divergence", "ld_alpha": 0.4}, beta=0.5)


@pytest.mark.parametrize("loss_type", sorted(set(TRL_LOSS_TYPES) - set(F_DIVERGENCE_LOSSES)))
def test_f_divergence_is_refused_where_trl_refuses_it(loss_type):
    with pytest.raises(ValueError, match="f_divergence"):
        Objective((Term(loss_type),), f_divergence="forward_kl")


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_use_weighting_is_refused_where_trl_refuses_it(loss_type):
    with pytest.raises(ValueError, match="use_weighting"):
        Objective((Term(loss_type),), use_weighting=True)
