"""examples/onpolicy_3d.py's scenario builder: four pair sets, each response from the source it claims."""
from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import onpolicy_3d  # noqa: E402


def source_pairs(source: str, prompts: list[str], scores: dict[str, tuple[float, float]]) -> list[dict]:
    """label.py-style pairs whose texts name their source, so a built pair shows where each side came from."""
    return [{"prompt": p, "chosen": f"{source} best {p}", "rejected": f"{source} worst {p}",
             "chosen_score": scores[p][0], "rejected_score": scores[p][1], "chosen_length": 3, "rejected_length": 5}
            for p in prompts]


def test_scenarios_take_chosen_and_rejected_from_the_sources_they_name():
    prompts = [f"list {n} fruits" for n in range(2, 6)]
    policy = source_pairs("policy", prompts, {p: (2.0, 0.0) for p in prompts})
    dataset = source_pairs("dataset", prompts[1:], {p: (3.0, -1.0) for p in prompts})
    built = onpolicy_3d.build_scenarios(policy, dataset)
    assert list(built) == list(onpolicy_3d.SCENARIOS)
    for name, (chosen_from, rejected_from) in onpolicy_3d.SCENARIOS.items():
        rows = built[name]
        assert [r["prompt"] for r in rows] == prompts[1:]  # only prompts that both sources answer
        assert all(r["chosen"] == f"{chosen_from} best {r['prompt']}" for r in rows)
        assert all(r["rejected"] == f"{rejected_from} worst {r['prompt']}" for r in rows)
    assert built["1 on-policy"][0]["chosen_from"] == "policy" and built["4 off-policy"][0]["rejected_from"] == "dataset"


def test_a_prompt_leaves_every_scenario_when_one_of_its_pairs_is_not_ordered_by_the_reward():
    """The dataset's best (0.5) is below the policy's worst (1.0) on the first prompt: scenario 2's pair
    there would prefer the worse response, so that prompt is dropped from all four sets alike."""
    prompts = ["list 2 fruits", "list 3 fruits"]
    policy = source_pairs("policy", prompts, {prompts[0]: (2.0, 1.0), prompts[1]: (2.0, 0.0)})
    dataset = source_pairs("dataset", prompts, {prompts[0]: (0.5, -1.0), prompts[1]: (3.0, -1.0)})
    built = onpolicy_3d.build_scenarios(policy, dataset)
    assert all([r["prompt"] for r in rows] == [prompts[1]] for rows in built.values())


def test_demonstrator_samples_are_in_sample_py_format(tiny_tokenizer):
    rows = onpolicy_3d.demonstrator_samples(["list 3 fruits", "name 2 birds except owl"], 4, 0, tiny_tokenizer)
    assert [len(r["responses"]) for r in rows] == [4, 4]
    for r in rows[0]["responses"]:
        assert r["finish_reason"] == "eos"
        assert r["num_tokens"] == len(tiny_tokenizer(r["text"], add_special_tokens=False)["input_ids"]) + 1
    assert rows == onpolicy_3d.demonstrator_samples(["list 3 fruits", "name 2 birds except owl"], 4, 0, tiny_tokenizer)
