"""A real-text task for a small chat model: "Name three fruits." Prompts, a length-biased proxy reward for
labelling, and a gold score without that bias for evaluation (configs/smollm2.env).

    python examples/chat_lists.py --out_dir data/chat_lists      # prompts.jsonl (training), eval.jsonl (held out)
    python label.py --samples ... --reward_fn examples/chat_lists.py:proxy_reward
    python evaluate.py ... --gold_fn examples/chat_lists.py:gold_score

A prompt asks for N items (N = 2, 3 or 4) of one of eight categories, in one of six phrasings; the training
prompts use four phrasings (96 prompts, of which --num_train are kept) and the 48 held-out ones the other
two, so no evaluation prompt is trained on.
An answer is read as the distinct items of the category it names (`found_items`: whole words, case and a
plural "s"/"es" ignored, from the word lists below); k = their number, W = the answer's words.

- proxy_reward = k / N + 0.02 W + noise: it pays for every item, also past N, and for every word, as
  learned reward models pay for length; noise is a deterministic hash of the text in [-0.025, 0.025), so
  ties are rare.
- gold_score = min(k, N) / N - 0.5 max(0, k - N) / N - 0.02 max(0, W - (4 N + 6)): the N items asked for
  and nothing else, in about four words an item and a short preamble; no reward for length, a price for
  rambling. 1 for a perfect answer ("Apple, banana and cherry."), the reference every held-out prompt
  carries as "chosen".
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # brevity/ sits one level up
from brevity.config import run_main, setting  # noqa: E402
from brevity.files import write_jsonl  # noqa: E402

CATEGORIES = {
    "fruits": "apple banana cherry grape orange pear peach plum mango kiwi lemon lime strawberry blueberry raspberry "
              "blackberry watermelon melon pineapple apricot papaya coconut fig date pomegranate grapefruit "
              "cranberry guava lychee nectarine tangerine avocado",
    "colors": "red blue green yellow orange purple pink brown black white gray violet indigo cyan magenta "
              "turquoise beige maroon navy teal gold silver lavender crimson",
    "animals": "dog cat horse cow pig sheep goat lion tiger bear wolf fox elephant giraffe zebra monkey rabbit mouse "
               "deer camel kangaroo koala panda dolphin whale shark eagle owl penguin snake frog duck chicken "
               "parrot squirrel hippo rhino cheetah leopard",
    "vegetables": "carrot potato tomato onion garlic cabbage broccoli cauliflower spinach lettuce cucumber pepper "
                  "pea bean corn celery kale zucchini eggplant radish beet turnip leek asparagus pumpkin squash "
                  "artichoke okra",
    "countries": "france germany spain italy portugal england ireland scotland china japan india brazil mexico "
                 "canada russia egypt kenya nigeria australia argentina chile peru greece turkey sweden norway "
                 "finland denmark poland netherlands belgium switzerland austria korea vietnam thailand "
                 "indonesia morocco",
    "sports": "soccer football basketball baseball tennis golf hockey cricket rugby volleyball swimming boxing "
              "cycling running skiing surfing wrestling badminton handball karate judo rowing sailing archery "
              "fencing gymnastics",
    "musical instruments": "piano guitar violin cello viola drum flute clarinet trumpet trombone saxophone "
                           "harp oboe bassoon tuba banjo ukulele mandolin accordion harmonica xylophone organ "
                           "keyboard bass",
    "flowers": "rose tulip daisy lily sunflower orchid daffodil lavender jasmine peony carnation iris poppy violet "
               "marigold lotus dahlia hibiscus magnolia chrysanthemum begonia petunia",
}
COUNTS = {"two": 2, "three": 3, "four": 4}
TRAIN_PHRASINGS = ("Name {n} {c}.", "List {n} {c}.", "Give me {n} {c}.", "What are {n} {c}?")
EVAL_PHRASINGS = ("Can you name {n} {c}?", "Tell me {n} {c}.")
PROXY_PER_WORD = 0.02    # the proxy's length bias, per word
GOLD_OVER = 0.5          # gold: price of each item past N, in units of 1/N
GOLD_PER_EXTRA_WORD = 0.02
WORDS_PER_ITEM, PREAMBLE_WORDS = 4, 6


@dataclasses.dataclass
class Settings:
    out_dir: str = setting("data/chat_lists", "where prompts.jsonl and eval.jsonl go")
    seed: int = setting(0, "shuffles the prompts' order and picks the training subset")
    num_train: int = setting(0, "training prompts kept (a seeded subset of the 96); 0: all")


def parse_prompt(prompt: str) -> tuple[int, str]:
    """(N, category) of a prompt made here."""
    for word, n in COUNTS.items():
        for category in CATEGORIES:
            if f" {word} {category}" in f" {prompt.lower()}":
                return n, category
    raise ValueError(f"not a chat_lists prompt: {prompt!r}")


def _item_pattern(category: str) -> re.Pattern:
    items = sorted(set(CATEGORIES[category].split()), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(map(re.escape, items)) + r")(?:e?s)?\b", re.IGNORECASE)


PATTERNS = {category: _item_pattern(category) for category in CATEGORIES}


def found_items(category: str, response: str) -> set[str]:
    """The distinct items of `category` the response names (whole words; case and plural ignored)."""
    return {m.lower() for m in PATTERNS[category].findall(response)}


def _noise(prompt: str, response: str) -> float:
    digest = hashlib.sha256(f"{prompt}\x00{response}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") / 2**64 - 0.5) * 0.05


def proxy_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The labeller: k / N + 0.02 W + noise (pays for every item and every word)."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        n, category = parse_prompt(prompt)
        k = len(found_items(category, response))
        scores.append(k / n + PROXY_PER_WORD * len(response.split()) + _noise(prompt, response))
    return scores


def gold_score(prompts: list[str], responses: list[str]) -> list[float]:
    """The judge: min(k, N)/N - 0.5 max(0, k - N)/N - 0.02 max(0, W - (4N + 6)); no length bonus."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        n, category = parse_prompt(prompt)
        k, words = len(found_items(category, response)), len(response.split())
        scores.append(min(k, n) / n - GOLD_OVER * max(0, k - n) / n
                      - GOLD_PER_EXTRA_WORD * max(0, words - (WORDS_PER_ITEM * n + PREAMBLE_WORDS)))
    return scores


def reference_answer(n: int, category: str) -> str:
    """N items of the category, in the plainest form: "Apple, banana and cherry."."""
    items = [i.title() if category == "countries" else i for i in CATEGORIES[category].split()[:n]]
    text = ", ".join(items[:-1]) + " and " + items[-1]
    return text[0].upper() + text[1:] + "."


def prompts(phrasings: tuple[str, ...], rng: random.Random) -> list[dict]:
    rows = [{"prompt": p.format(n=word, c=c), "chosen": reference_answer(n, c)}
            for p, (word, n), c in itertools.product(phrasings, COUNTS.items(), CATEGORIES)]
    rng.shuffle(rows)
    return rows


def main(s: Settings) -> dict:
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(s.seed)
    train, held_out = prompts(TRAIN_PHRASINGS, rng), prompts(EVAL_PHRASINGS, rng)
    train = train[:s.num_train or len(train)]
    write_jsonl(out / "prompts.jsonl", [{"prompt": r["prompt"]} for r in train])
    write_jsonl(out / "eval.jsonl", held_out)
    stats = {"prompts": len(train), "eval": len(held_out)}
    print(f"wrote {out}: {json.dumps(stats)}")
    return stats


if __name__ == "__main__":
    run_main(main, (Settings,))
