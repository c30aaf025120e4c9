"""The 3D-properties toy (examples/toy_3d.py) shows what PAPERS.md section 3 says it should (CPU, seconds).

One run per loss (dpo, dpo_sft, flexdpo with their losses.py defaults), seed 0, 800 Adam steps at 2e-3.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import toy_3d  # noqa: E402
from losses import loss_hyperparameters  # noqa: E402


@pytest.fixture(scope="module")
def curves() -> dict[str, toy_3d.Curves]:
    return {name: toy_3d.train_preferences(name, loss_hyperparameters(name)) for name in ("dpo", "dpo_sft", "flexdpo")}


def test_sft_step_fits_the_initial_probabilities(curves):
    """Step 1 lands on initial_probs(): chosen 0.1, each rejected 0.15, responses outside the pairs 0.3."""
    dpo = curves["dpo"]
    assert dpo.chosen[0] == pytest.approx(0.1, abs=0.005)
    assert dpo.rejected[0] == pytest.approx(0.15, abs=0.005)
    assert dpo.unseen[0] == pytest.approx(0.3, abs=0.01)


def test_dpo_drives_the_rejected_probabilities_to_zero(curves):
    """Drastic drop: from 0.15 to under 1% of that."""
    assert curves["dpo"].rejected[-1] < 0.01 * curves["dpo"].rejected[0]


def test_dpo_chosen_probability_rises_then_falls(curves):
    """Degradation: the chosen probability climbs well above its start, then loses much of the gain."""
    chosen = curves["dpo"].chosen
    peak = max(chosen)
    assert peak > chosen[0] + 0.3
    assert chosen[-1] < peak - 0.3


def test_dpo_moves_mass_to_responses_outside_the_prompts_pairs(curves):
    """Dispersion: the responses no pair of the prompt contains end with more mass than they started with."""
    assert curves["dpo"].unseen[-1] > curves["dpo"].unseen[0] + 0.1


@pytest.mark.parametrize("name", ["dpo_sft", "flexdpo"])
def test_regulariser_keeps_the_chosen_probability_above_dpo(curves, name):
    """dpo_sft (SFT term on y_w) and flexdpo (beta_rejected 0.05 < beta_chosen 0.1) end with a clearly
    higher chosen probability than dpo."""
    assert curves[name].chosen[-1] > curves["dpo"].chosen[-1] + 0.3


def test_main_draws_the_curves_of_each_loss(tmp_path):
    toy_3d.main(losses=("dpo",), figure=str(tmp_path / "toy_3d.png"))
    assert (tmp_path / "toy_3d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
