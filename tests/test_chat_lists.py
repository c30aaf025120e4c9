"""examples/chat_lists.py: the proxy pays for length, the gold does not, and both load as label.py and
evaluate.py load a reward given as path/to/file.py:function."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import chat_lists  # noqa: E402
from brevity.scoring import load_function  # noqa: E402


def test_every_held_out_reference_answer_has_gold_one(tmp_path):
    stats = chat_lists.main(chat_lists.Settings(out_dir=str(tmp_path)))
    rows = chat_lists.prompts(chat_lists.EVAL_PHRASINGS, __import__("random").Random(0))
    assert stats == {"prompts": 96, "eval": 48} and len(rows) == 48
    assert chat_lists.gold_score([r["prompt"] for r in rows], [r["chosen"] for r in rows]) == [1.0] * 48


def test_the_proxy_pays_for_words_and_extra_items_the_gold_charges_for_them():
    """k = 3 of 3 fruits: gold 1, proxy 1 + 0.02 * 4 words. Padding it with 20 words raises the proxy by 0.4
    and costs the gold 0.02 per word past 4 * 3 + 6 = 18; two extra fruits pay the proxy 2/3 and cost the
    gold 0.5 * 2/3."""
    prompt = ["Name three fruits."]
    plain = "Apple, banana and cherry."
    padded = plain + " These are all delicious and healthy fruits that many people enjoy eating every single day here."
    more = "Apple, banana, cherry, grape and plum."
    gold, proxy = chat_lists.gold_score, chat_lists.proxy_reward
    assert gold(prompt, [plain]) == [1.0] and abs(proxy(prompt, [plain])[0] - 1.08) < 0.025
    words = len(padded.split())
    assert gold(prompt, [padded])[0] == 1.0 - 0.02 * (words - 18)
    assert proxy(prompt, [padded])[0] > proxy(prompt, [plain])[0] + 0.02 * (words - 4) - 0.05
    assert abs(gold(prompt, [more])[0] - (1 - 0.5 * 2 / 3)) < 1e-12
    assert proxy(prompt, [more])[0] > proxy(prompt, [plain])[0] + 2 / 3 - 0.05


def test_items_are_whole_words_of_the_prompts_category_in_any_case_or_plural():
    assert chat_lists.found_items("fruits", "Bananas, APPLES and a pineapple; not grapefruits") == {
        "banana", "apple", "pineapple", "grapefruit"}
    assert chat_lists.found_items("fruits", "red, blue, pearl") == set()
    assert chat_lists.parse_prompt("Can you name four musical instruments?") == (4, "musical instruments")


def test_the_rewards_load_from_their_file_as_the_stages_load_them():
    proxy = load_function(f"{ROOT / 'examples' / 'chat_lists.py'}:proxy_reward", "--reward_fn")
    gold = load_function(f"{ROOT / 'examples' / 'chat_lists.py'}:gold_score", "--gold_fn")
    assert gold(["List two colors."], ["Red and blue."]) == [1.0] and proxy(["List two colors."], ["Red"])[0] > 0.4
