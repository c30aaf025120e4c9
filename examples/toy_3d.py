"""The 3D-properties toy (arXiv 2406.07327; PAPERS.md section 3), trained through the losses in losses.py.

4 prompts, 10 responses: response i (0-3) is the chosen one for prompt i, 4-7 are rejected, 8-9 are in no
pair. The policy is a 3-layer MLP from a one-hot prompt to a categorical over the 10 responses, so a
response is a single "token": logp(y) is its log-probability and |y| = 1.
Step 1 ("SFT") fits the policy to `initial_probs()`; step 2 trains on pairs (prompt i, chosen i, a random
rejected from 4-7) against the frozen SFT policy as the reference, through `losses.LOSSES[name].fn`.

    python examples/toy_3d.py        # dpo, dpo_sft, flexdpo, each with its defaults in losses.py; runs/toy_3d.png

Expected (seed 0), in about 4 s on 2 CPU cores:
    dpo      chosen 0.100 -> peak 0.83 -> 0.28 | rejected 0.150 -> 0.0000 | unseen 0.300 -> 0.72 | ...
    dpo_sft  chosen 0.100 -> peak 1.00 -> 1.00 | rejected 0.150 -> 0.0000 | unseen 0.300 -> 0.00 | ...
    flexdpo  chosen 0.100 -> peak 1.00 -> 0.95 | rejected 0.150 -> 0.0000 | unseen 0.300 -> 0.05 | ...
With dpo the rejected probabilities collapse (drastic drop), the chosen probability rises and then falls
(degradation) and the responses outside the prompt's pairs end with more mass than they started with
(dispersion). dpo_sft and flexdpo (beta_rejected < beta_chosen) keep the chosen probability up.

What "unseen" means here: for prompt i, every response that no pair of prompt i contains, i.e. the other
three prompts' chosen responses and 8-9. The lost chosen mass goes to the other prompts' chosen responses,
which the MLP's shared weights pull up for every prompt. Responses 8-9 on their own (the `never_paired`
curve) do not gain: no loss gradient reaches their own output weights, so they keep no share of the
softmax mass once the chosen logits grow. The learning rate (Adam 2e-3, paper: 5e-7 on LLMs) is large so that all of
this shows within 800 steps.
"""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # losses.py and brevity/ sit one level up
from losses import LOSSES, loss_hyperparameters  # noqa: E402

N_PROMPTS, N_RESPONSES = 4, 10
CHOSEN, REJECTED, NEVER_PAIRED = [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]


def initial_probs() -> torch.Tensor:
    """[4, 10] "SFT" distribution: prompt i puts 0.1 on its chosen response i, 0.05 on each other prompt's
    chosen response, 0.15 on each rejected response and 0.075 on each of 8-9 (off-policy pairs: the
    rejected responses are more likely than the chosen one)."""
    probs = torch.full((N_PROMPTS, N_RESPONSES), 0.05)
    probs[:, REJECTED] = 0.15
    probs[:, NEVER_PAIRED] = 0.075
    probs[range(N_PROMPTS), CHOSEN] = 0.1
    return probs


def make_policy(hidden: int = 64) -> torch.nn.Module:
    """The 3-layer MLP: one-hot prompt [B, 4] -> logits [B, 10]."""
    return torch.nn.Sequential(
        torch.nn.Linear(N_PROMPTS, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, N_RESPONSES),
    )


def all_logprobs(policy: torch.nn.Module) -> torch.Tensor:
    """[4, 10] log pi(response | prompt) for every prompt and response."""
    return F.log_softmax(policy(torch.eye(N_PROMPTS)), dim=-1)


def fit_sft(policy: torch.nn.Module, target: torch.Tensor, steps: int = 500, lr: float = 1e-2) -> None:
    """Step 1: minimise the cross-entropy to the target distribution [4, 10]."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        loss = -(target * all_logprobs(policy)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@dataclass
class Curves:
    """One point per training step (and one after the last), each averaged over the 4 prompts."""
    chosen: list[float] = field(default_factory=list)        # pi(i | i)
    rejected: list[float] = field(default_factory=list)      # pi(y | i) of one rejected response y in 4-7
    unseen: list[float] = field(default_factory=list)        # mass on the responses no pair of prompt i contains
    never_paired: list[float] = field(default_factory=list)  # mass on 8-9

    def record(self, probs: torch.Tensor) -> None:
        chosen = probs[range(N_PROMPTS), CHOSEN]
        self.chosen.append(chosen.mean().item())
        self.rejected.append(probs[:, REJECTED].mean().item())
        self.unseen.append((1 - chosen - probs[:, REJECTED].sum(-1)).mean().item())
        self.never_paired.append(probs[:, NEVER_PAIRED].sum(-1).mean().item())


def train_preferences(loss: str, hyperparameters: dict[str, float], steps: int = 800, lr: float = 2e-3,
                      pairs_per_prompt: int = 4, seed: int = 0) -> Curves:
    """Steps 1 and 2 with LOSSES[loss]; returns the curves (steps + 1 points)."""
    torch.manual_seed(seed)
    policy = make_policy()
    fit_sft(policy, initial_probs())
    with torch.no_grad():
        reference = all_logprobs(policy)
    prompts = torch.arange(N_PROMPTS).repeat(pairs_per_prompt)
    ones = torch.ones(len(prompts))
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    curves = Curves()
    for _ in range(steps):
        logprobs = all_logprobs(policy)
        curves.record(logprobs.detach().exp())
        rejected = torch.tensor(REJECTED)[torch.randint(len(REJECTED), (len(prompts),))]
        losses, _, _ = LOSSES[loss].fn(
            policy_chosen_logps=logprobs[prompts, prompts], policy_rejected_logps=logprobs[prompts, rejected],
            reference_chosen_logps=reference[prompts, prompts], reference_rejected_logps=reference[prompts, rejected],
            chosen_lengths=ones, rejected_lengths=ones, **hyperparameters)
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    curves.record(all_logprobs(policy).detach().exp())
    return curves


def main(losses: tuple[str, ...] = ("dpo", "dpo_sft", "flexdpo"), seed: int = 0,
         figure: str = "runs/toy_3d.png") -> dict[str, Curves]:
    """Train with each loss, print the curves' start, peak and end, and draw them to `figure`."""
    results = {name: train_preferences(name, loss_hyperparameters(name), seed=seed) for name in losses}
    for name, c in results.items():
        print(f"{name:8s} chosen {c.chosen[0]:.3f} -> peak {max(c.chosen):.2f} -> {c.chosen[-1]:.2f}"
              f" | rejected {c.rejected[0]:.3f} -> {c.rejected[-1]:.4f}"
              f" | unseen {c.unseen[0]:.3f} -> {c.unseen[-1]:.2f}"
              f" | never_paired {c.never_paired[0]:.3f} -> {c.never_paired[-1]:.3f}")
    from brevity import plots

    plots.plot_curves({name: dataclasses.asdict(c) for name, c in results.items()},
                      ("chosen", "rejected", "unseen", "never_paired"), figure)
    print(f"wrote {figure}")
    return results


if __name__ == "__main__":
    main()
