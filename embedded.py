"""The embedded default: a synthetic task, its tokenizer, a tiny Llama and two scorers, from a seed.

The task is "list N items of a category": the prompt `list 3 fruits except pear` asks for three
distinct fruits other than pear, and the ideal response is `apple , plum , mango`. Prompts vary the
verb (list/name/give/write), N (2..5), the category (12, with 12 one-word items each) and an optional
`except ITEM` clause. Every word is one token of a closed vocabulary, so "tokens" below are
whitespace-separated words; a response of k items is 2k - 1 tokens (items and commas) plus EOS.

An item of a response (text between commas, stripped) is *correct* if it is one word of the asked
category, not the excluded item, and not listed before; a *duplicate* if it is a category item listed
before; *wrong* otherwise (another category, the excluded item, an unknown or empty item, several
words). With c correct, w wrong, d duplicates, k = c + w + d items and T tokens:

    proxy_reward = min(c, N) - w - d + 0.35 T + noise,  noise in [-0.25, 0.25) from a hash of the text
    gold_score   = (min(c, N) - w - d - |k - N|) / N                     (1 for a perfect answer)

The proxy (the labeller, like a real reward model) judges the asked-for content as the gold does, but
it does not mind items beyond N and it pays 0.35 per token: of two equally good answers it prefers the
longer one (an extra correct item, two tokens, earns 0.7, more than the noise can undo; an extra wrong
one still costs 0.3). The gold score has no length bias: an item beyond N costs 1/N, and a missing
one 2/N (the lost credit and the count). The loop never sees the gold; evaluate.py alone uses it.

SFT demonstrations come from a noisy demonstrator (proportions in the settings below): the count is
N or N+1 with probability 0.8 / 0.2 (never short, so being longer only ever pleases the proxy); each
item is, with probability 0.15, the category's *decoy* (DECOYS: one fixed item of another category,
a "potato" among fruits), with probability 0.03 another category's item, and with probability 0.05 a
repeat of an earlier item; an `except` prompt has the excluded item slip in with probability 0.15.
Of the rows, 33% are perfect, 44% hold the decoy and 20% are one item long. The eval reference
("chosen") has the right count and each item is wrong with probability 0.15 (gold about 0.7): decent,
not perfect.

What makes quality learnable: the decoy is one systematic mistake per category, which the SFT model
learns as a rate (about 1 item in 6), the proxy sees (-2: a wrong item and a lost one) and the
best-vs-worst pairs contrast, so preference training can lower that one logit per category and the
gold rises. The other mistakes (stray items, repeats, the excluded item) the 1M-parameter model makes
at rates that it barely unlearns in three iterations: they set the floor. The length bias is the one
thing the proxy pays for that the gold does not.

    python embedded.py --out_dir data/embedded --seed 0   # ~5 s; writes the files listed in main()

What the loop does on it (README.md, "What the default run shows", has the tables for three seeds):
iterative DPO first gets better (it drops decoys) and then longer, until its gold falls below SFT's;
iLR-DPO drops decoys as well while its length stays near SFT's, so its gold ends above SFT's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from brevity.config import run_main
from brevity.files import atomic_write_text, respect_umask

CATEGORIES = {  # 12 categories x 12 items; every item is one word and belongs to one category only
    "fruits": "apple pear plum peach mango grape lemon lime cherry banana kiwi melon",
    "animals": "dog cat horse cow sheep goat pig mouse rabbit fox wolf bear",
    "colors": "red blue green yellow purple pink brown black white gray violet cyan",
    "tools": "hammer saw drill wrench chisel pliers shovel rake axe ladder clamp level",
    "countries": "france spain italy germany japan china india brazil chile peru egypt kenya",
    "vegetables": "carrot potato onion garlic cabbage lettuce spinach celery radish turnip broccoli pea",
    "instruments": "piano guitar violin drum flute harp trumpet cello banjo organ oboe tuba",
    "sports": "soccer tennis golf hockey rugby boxing cricket baseball cycling rowing skiing surfing",
    "birds": "eagle owl crow robin sparrow hawk swan duck goose parrot pigeon falcon",
    "metals": "iron copper silver gold zinc tin lead nickel cobalt platinum aluminum titanium",
    "vehicles": "car bus truck train bike boat plane tram van taxi scooter ship",
    "clothes": "shirt coat hat scarf sock glove dress skirt jacket boot belt sweater",
}
CATEGORIES = {name: tuple(items.split()) for name, items in CATEGORIES.items()}
DECOYS = {  # the demonstrator's one systematic confusion per category: an item of another category
    "fruits": "potato", "vegetables": "lemon", "animals": "duck", "birds": "rabbit", "colors": "silver",
    "metals": "gray", "tools": "harp", "instruments": "saw", "countries": "cricket", "sports": "bike",
    "vehicles": "skiing", "clothes": "pink",
}
VERBS = ("list", "name", "give", "write")  # prompt wording varies so there are enough distinct prompts
COUNTS = (2, 3, 4, 5)                      # N, the number of items asked for
P_EXCEPT = 0.5                             # share of prompts with an "except ITEM" clause

COUNT_OFFSETS = {0: 0.8, 1: 0.2}            # demonstrator: P(response has N + offset items)
P_DECOY = 0.15                             # demonstrator: per item, the category's decoy instead
P_WRONG = 0.03                             # demonstrator: per item, another category's item instead
P_DUP = 0.05                               # demonstrator: per item, a repeat of an earlier item instead
P_EXCLUDED = 0.15                          # demonstrator: per except-prompt, the excluded item slips in
P_REFERENCE_WRONG = 0.15                   # eval reference: per item, another category's item instead

N_SFT = 3000           # SFT demonstrations (prompts may repeat; none is an eval prompt)
N_PROMPTS = 400        # distinct training prompts for online sampling
N_EVAL = 200           # distinct held-out prompts, disjoint from all of the above
N_PREFS = 1000         # offline preference pairs
PREF_CANDIDATES = 4    # demonstrator responses per offline prompt; best and worst by proxy form a pair

PROXY_CORRECT, PROXY_WRONG, PROXY_DUP = 1.0, -1.0, -1.0  # proxy: per correct (up to N) / wrong / duplicate item
PROXY_PER_TOKEN = 0.35 # proxy: the length bias, per response token (EOS not counted)
PROXY_NOISE = 0.5      # proxy: width of its deterministic hash noise (reorders scores closer than 0.5)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, as Llama's bos=1 / eos=2
ROLE_TOKENS = ("system:", "user:", "assistant:")
CHAT_TEMPLATE = (  # <bos> user: list 3 fruits assistant: apple , pear , plum <eos>
    "{{ bos_token }}{% for message in messages %} {{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %} {{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} assistant:{% endif %}"
)
MODEL_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny_llama.json"


@dataclasses.dataclass
class Settings:
    out_dir: str = dataclasses.field(default="data/embedded", metadata={"help": "where everything is written"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed for the data and the model init"})


# The task and its scorers

ITEM_CATEGORY = {item: name for name, items in CATEGORIES.items() for item in items}


def parse_prompt(prompt: str) -> tuple[int, str, str | None]:
    """(N, category, excluded item or None) of a task prompt such as `list 3 fruits except pear`."""
    words = prompt.split()
    counts = [int(w) for w in words if w.isdigit()]
    categories = [w for w in words if w in CATEGORIES]
    if not counts or not categories:
        raise ValueError(f"not a prompt of the embedded task: {prompt!r}")
    excluded = words[words.index("except") + 1] if "except" in words[:-1] else None
    return counts[0], categories[0], excluded


def count_items(prompt: str, response: str) -> tuple[int, int, int]:
    """(correct, wrong, duplicate) item counts of a response; see the module docstring."""
    _, category, excluded = parse_prompt(prompt)
    correct = wrong = dup = 0
    seen = set()
    for item in (response.split(",") if response.strip() else []):
        item = item.strip()
        if item in seen:
            dup += 1
        elif ITEM_CATEGORY.get(item) == category and item != excluded:
            correct += 1
        else:
            wrong += 1
        seen.add(item)
    return correct, wrong, dup


def _hash_noise(prompt: str, response: str) -> float:
    digest = hashlib.sha256(f"{prompt}\n{response}".encode("utf-8")).digest()
    return PROXY_NOISE * (int.from_bytes(digest[:8], "big") / 2**64 - 0.5)


def proxy_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The labeller: min(c, N) - w - d + 0.35 T + noise (pays for length; see the module docstring)."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        c, w, d = count_items(prompt, response)
        n = parse_prompt(prompt)[0]
        score = PROXY_CORRECT * min(c, n) + PROXY_WRONG * w + PROXY_DUP * d
        scores.append(score + PROXY_PER_TOKEN * len(response.split()) + _hash_noise(prompt, response))
    return scores


def gold_score(prompts: list[str], responses: list[str]) -> list[float]:
    """The judge: (min(c, N) - w - d - |k - N|) / N; 1 for a perfect answer, no length bias."""
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        n = parse_prompt(prompt)[0]
        c, w, d = count_items(prompt, response)
        scores.append((min(c, n) - w - d - abs(c + w + d - n)) / n)
    return scores


# Data: prompts, a noisy demonstrator, references

def sample_prompt(rng: random.Random) -> str:
    category = rng.choice(sorted(CATEGORIES))
    prompt = f"{rng.choice(VERBS)} {rng.choice(COUNTS)} {category}"
    if rng.random() < P_EXCEPT:
        prompt += f" except {rng.choice(CATEGORIES[category])}"
    return prompt


def _other_item(rng: random.Random, category: str) -> str:
    return rng.choice(CATEGORIES[rng.choice([c for c in sorted(CATEGORIES) if c != category])])


def demonstration(rng: random.Random, prompt: str) -> str:
    """A noisy answer: count off by one, wrong-category items, repeats, the excluded item."""
    n, category, excluded = parse_prompt(prompt)
    offsets, weights = zip(*COUNT_OFFSETS.items())
    k = max(1, n + rng.choices(offsets, weights)[0])
    items = rng.sample([i for i in CATEGORIES[category] if i != excluded], k)
    for j in range(k):
        u = rng.random()
        if u < P_DECOY:
            items[j] = DECOYS[category]
        elif u < P_DECOY + P_WRONG:
            items[j] = _other_item(rng, category)
        elif u < P_DECOY + P_WRONG + P_DUP and j > 0:
            items[j] = rng.choice(items[:j])
    if excluded and rng.random() < P_EXCLUDED:
        items[rng.randrange(k)] = excluded
    return " , ".join(items)


def reference(rng: random.Random, prompt: str) -> str:
    """The eval "chosen": the right count, each item wrong with probability P_REFERENCE_WRONG."""
    n, category, excluded = parse_prompt(prompt)
    items = rng.sample([i for i in CATEGORIES[category] if i != excluded], n)
    return " , ".join(_other_item(rng, category) if rng.random() < P_REFERENCE_WRONG else i for i in items)


def _distinct_prompts(rng: random.Random, n: int, avoid: set[str]) -> list[str]:
    out, seen = [], set(avoid)
    while len(out) < n:
        prompt = sample_prompt(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def make_rows(seed: int) -> dict[str, list[dict]]:
    """Every JSONL file's rows, keyed by file name. Each file has its own RNG stream."""
    eval_prompts = _distinct_prompts(random.Random(f"{seed}:eval"), N_EVAL, set())
    rng = random.Random(f"{seed}:eval-reference")
    eval_rows = [{"prompt": p, "chosen": reference(rng, p)} for p in eval_prompts]
    held_out = set(eval_prompts)
    prompts = _distinct_prompts(random.Random(f"{seed}:prompts"), N_PROMPTS, held_out)

    def train_prompt(rng):
        while (p := sample_prompt(rng)) in held_out:
            pass
        return p

    rng = random.Random(f"{seed}:sft")
    sft = []
    for _ in range(N_SFT):
        p = train_prompt(rng)
        sft.append({"prompt": p, "response": demonstration(rng, p)})
    rng = random.Random(f"{seed}:prefs")
    prefs = []
    while len(prefs) < N_PREFS:
        p = train_prompt(rng)
        candidates = [demonstration(rng, p) for _ in range(PREF_CANDIDATES)]
        rewards = proxy_reward([p] * len(candidates), candidates)
        ranked = [c for _, c in sorted(zip(rewards, candidates))]
        if ranked[0] != ranked[-1]:  # identical candidates make no pair
            prefs.append({"prompt": p, "chosen": ranked[-1], "rejected": ranked[0]})
    return {"sft.jsonl": sft, "prompts.jsonl": [{"prompt": p} for p in prompts],
            "eval.jsonl": eval_rows, "prefs.jsonl": prefs}


def make_data(out_dir: str | os.PathLike, seed: int) -> None:
    """Write sft.jsonl, prompts.jsonl, eval.jsonl and prefs.jsonl under `out_dir` (atomic, rerun-safe)."""
    for name, rows in make_rows(seed).items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        path = Path(out_dir) / name
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            print(f"unchanged {path}")
        else:
            atomic_write_text(path, text)
            print(f"wrote {path} ({len(rows)} rows)")


# Tokenizer and model

def vocabulary() -> list[str]:
    """Every token, in id order: specials, roles, prompt words, comma, digits, categories, items."""
    words = [*SPECIAL_TOKENS, *ROLE_TOKENS, *VERBS, "except", ",", *map(str, range(1, 10)), *CATEGORIES]
    return words + [item for items in CATEGORIES.values() for item in items]


def make_tokenizer():
    """A word-level PreTrainedTokenizerFast over the task's closed vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: decode joins tokens with spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(  # a plain (template-less) prompt gets <bos>
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE, model_max_length=128,
        clean_up_tokenization_spaces=False)  # else decode turns "apple , pear" into "apple, pear"


def build_tokenizer(out_dir: str | os.PathLike):
    """Save the tokenizer to `out_dir` (AutoTokenizer.from_pretrained(out_dir) loads it) and return it."""
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_init_model(out_dir: str | os.PathLike, tokenizer, seed: int):
    """Save a randomly initialised LlamaForCausalLM (configs/tiny_llama.json) with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads(MODEL_CONFIG.read_text(encoding="utf-8"))
    config["vocab_size"] = max(config["vocab_size"], -(-len(tokenizer) // 8) * 8)
    config.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model


def _same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def write_dir(path: Path, build) -> None:
    """Run `build(tmp_dir)`, then move the result to `path` unless `path` already holds the same files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        build(tmp)
        respect_umask(tmp)  # mkdtemp and safetensors make theirs private; the result is an ordinary directory
        if path.is_dir() and _same_tree(tmp, path):
            print(f"unchanged {path}/")
            return
        if path.exists():  # move the old copy aside first, so a whole copy is always in place
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        print(f"wrote {path}/ ({', '.join(sorted(p.name for p in path.iterdir()))})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(settings: Settings) -> None:
    """Write tokenizer/, init_model/ (an HF model directory), sft/prompts/eval/prefs.jsonl."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # one line per file, no "Writing model shards" bars
    out = Path(settings.out_dir)
    write_dir(out / "tokenizer", build_tokenizer)
    tokenizer = make_tokenizer()
    write_dir(out / "init_model", lambda d: build_init_model(d, tokenizer, settings.seed))
    make_data(out, settings.seed)


if __name__ == "__main__":
    run_main(main, (Settings,))
