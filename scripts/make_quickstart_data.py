#!/usr/bin/env python
"""Generate the quickstart's synthetic instruction data (SFT and DPO), deterministically.

    python scripts/make_quickstart_data.py            # writes examples/data/quickstart/*.jsonl

Eleven short templated tasks whose answers are checked by exact match, graded for what a
~1M-parameter model can learn on a CPU in about a minute. What such a model can learn that fast
is copying a token from a FIXED distance back and simple lookups; copying from an arbitrary place
(induction heads) needs far more training than the quickstart has. So every prompt ends with the
thing it is about (templates put the number or words last), and the tasks range from ones the
tiny model learns in a minute to ones it cannot. Held-out exact match of lmpipeline/assets/tiny-chat
after 800 LoRA steps (r16, lr 3e-3, batch 16; 63 s on 2 CPU cores), from 0 before training:
  learned:  word count 10/10, odd/even 15/15, larger of two 11/25
  partly:   next/previous number 6/24, sort 3-4 digits 4/15, count from a to b 3/14
  barely:   add 3/28, repeat 1-2 words 1/15, last word of a list 1/19
  not:      opposites 0/23, reversing letters 0/12
Every task item (the numbers or words a prompt is built from) is assigned to "train" or
"heldout" by a hash of the item, so eval/golden prompts ask about numbers and words (or lists)
that the training prompts never ask about; for opposites it is one direction of a pair
("opposite of cold" held out while "opposite of hot" may be trained): the pair itself is in the
tiny model's pretraining text, and a word never trained on at all is beyond a 1M model's LoRA.

Files (all JSON lines):
  sft_train.jsonl  4000  {"messages": [system?, user, assistant, (user, assistant)?]}
  sft_eval.jsonl    200  same shape, held-out items
  golden.jsonl       33  {"prompt": str, "reference": str, "task": str}: 3 held-out items a task
  dpo_train.jsonl  1500  {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}
  dpo_eval.jsonl    150  same shape, held-out items, prompts disjoint from sft_eval and golden

All text is written by this script (word lists below); nothing third-party. The word lists and
`pretraining_documents` are also used by scripts/make_tiny_model.py to pretrain the tiny model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234
HELDOUT_PERCENT = 20
SYSTEM_PROMPT = "You are a concise assistant."
OUT_DIR = Path(__file__).resolve().parents[1] / "examples" / "data" / "quickstart"

# Pairs of opposites; every word appears once, so each prompt has one right answer. Kept to 60
# so that the tiny model's short pretraining can learn them all (held-out pairs included).
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("open", "closed"),
    ("light", "dark"), ("happy", "sad"), ("early", "late"), ("full", "empty"), ("wet", "dry"),
    ("hard", "soft"), ("long", "short"), ("high", "low"), ("new", "old"), ("rich", "poor"),
    ("strong", "weak"), ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"), ("in", "out"),
    ("left", "right"), ("top", "bottom"), ("first", "last"), ("near", "far"),
    ("inside", "outside"), ("push", "pull"), ("give", "take"), ("win", "lose"), ("buy", "sell"),
    ("start", "finish"), ("above", "below"), ("before", "after"), ("true", "false"),
    ("yes", "no"), ("day", "night"), ("black", "white"), ("north", "south"), ("east", "west"),
    ("summer", "winter"), ("alive", "dead"), ("sweet", "sour"), ("wide", "narrow"),
    ("deep", "shallow"), ("brave", "cowardly"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("easy", "difficult"), ("friend", "enemy"), ("question", "answer"), ("laugh", "cry"),
    ("remember", "forget"), ("arrive", "leave"), ("always", "never"), ("begin", "end"),
    ("come", "go"), ("king", "queen"), ("boy", "girl"), ("man", "woman"), ("love", "hate"),
    ("rise", "fall"),
]

NOUNS = [
    "apple", "river", "stone", "lamp", "cloud", "tree", "house", "bird", "fish", "dog", "cat",
    "horse", "book", "chair", "table", "door", "window", "road", "car", "train", "boat", "ship",
    "star", "moon", "sun", "rain", "snow", "wind", "fire", "water", "bread", "milk", "cheese",
    "egg", "cake", "cup", "plate", "spoon", "knife", "fork", "shoe", "hat", "coat", "shirt",
    "ring", "box", "bag", "pen", "paper", "clock", "bell", "key", "lock", "rope", "wheel",
    "hill", "field", "forest", "garden", "flower", "grass", "leaf", "seed", "root", "branch",
    "sand", "shell", "wave", "lake", "pond", "bridge", "tower", "wall", "roof", "room", "bed",
    "desk", "phone", "song", "story", "letter", "word", "name", "game", "ball", "kite", "drum",
    "piano", "flute", "map", "coin", "gold", "silver", "iron", "glass", "wood", "paint",
    "brush", "candle", "basket", "bottle", "jar", "honey", "salt", "sugar", "rice", "bean",
    "corn", "grape", "lemon", "melon", "peach", "pear", "plum", "mouse", "frog", "bear", "wolf",
    "fox", "goat", "sheep", "duck", "owl", "bee", "ant", "tiger", "lion", "zebra", "camel",
]
COLORS = ["red", "blue", "green", "yellow", "brown", "pink", "gray", "purple", "orange"]
VERBS = ["sees", "finds", "likes", "moves", "holds", "wants", "draws", "makes", "keeps", "meets"]
WORDS = NOUNS + COLORS  # the vocabulary that word-list tasks draw from


def is_heldout(task: str, key: object) -> bool:
    """The split an item belongs to: a stable hash of task and item, not of the prompt wording."""
    digest = hashlib.sha256(f"{task}:{key}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


def _num_list(values) -> str:
    return " ".join(str(v) for v in values)


# Each task: (rng) -> (item key, prompt, answer, wrong answers for DPO). The split is chosen by the
# caller, which redraws until is_heldout(task, key) matches the split it wants.
Task = Callable[[random.Random], tuple[object, str, str, list[str]]]


def task_add(rng: random.Random):
    level = rng.random()
    hi = 9 if level < 0.35 else 20 if level < 0.7 else 99
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    s = a + b
    prompt = rng.choice(
        ["What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
         "Compute {a} + {b}."]
    ).format(a=a, b=b)
    wrong = [s + 1, s - 1, s + 10, s - 10] if s >= 10 else [s + 1, s + 2, abs(s - 1) if s else 1]
    wrong = [w for w in wrong if w >= 0 and w != s]
    return (min(a, b), max(a, b)), prompt, f"{a} plus {b} is {s}.", [f"{a} plus {b} is {w}." for w in wrong]


def task_next(rng: random.Random):
    n = rng.randint(11, 98)  # two digits in and out: the digits to copy sit at fixed places
    if rng.random() < 0.6:
        prompt = rng.choice(
            ["What number comes after {n}?", "What is the next number after {n}?",
             "Which number follows {n}?"]
        ).format(n=n)
        return ("after", n), prompt, str(n + 1), [str(n), str(n + 2), str(n - 1)]
    prompt = rng.choice(["What number comes before {n}?", "Which number is just before {n}?"]).format(n=n)
    return ("before", n), prompt, str(n - 1), [str(n), str(n + 1), str(n - 2)]


def task_parity(rng: random.Random):
    n = rng.randint(10, 99)
    prompt = rng.choice(
        ["Odd or even: {n}", "Is this number odd or even? {n}",
         "Tell me whether this number is odd or even: {n}"]
    ).format(n=n)
    right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return n, prompt, f"{n} is {right}.", [f"{n} is {wrong}."]


def task_count(rng: random.Random):
    a = rng.randint(10, 90)  # two digits for both ends: they sit at fixed places in the prompt
    b = a + rng.randint(2, 6)
    prompt = rng.choice(["Count from {a} to {b}.", "List the numbers from {a} to {b}."]).format(a=a, b=b)
    seq = list(range(a, b + 1))
    skipped = seq[:]
    del skipped[rng.randint(1, len(seq) - 2)]
    return (a, b), prompt, _num_list(seq), [_num_list(skipped), _num_list(seq[:-1]), _num_list(seq + [b + 1])]


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def task_repeat(rng: random.Random):
    ws = _words(rng, 1, 2)
    text = " ".join(ws)
    prompt = rng.choice(
        ["Repeat after me: {w}", "Say this back to me: {w}", "Echo these words: {w}"]
    ).format(w=text)
    other = rng.choice([w for w in WORDS if w not in ws])
    wrong = [" ".join(ws[:-1] + [other])] + ([" ".join(ws[::-1])] if len(ws) > 1 else [])
    return text, prompt, f"You said: {text}.", [f"You said: {w}." for w in wrong]


def task_last_word(rng: random.Random):
    ws = _words(rng, 3, 6)
    text = " ".join(ws)
    prompt = rng.choice(
        ["What is the last word of this list: {w}", "Name the last word in this list: {w}"]
    ).format(w=text)
    return text, prompt, f"The last word is {ws[-1]}.", [f"The last word is {w}." for w in (ws[0], ws[-2])]


def task_word_count(rng: random.Random):
    ws = _words(rng, 2, 7)
    text = " ".join(ws)
    prompt = rng.choice(["How many words are in this list: {w}", "Count the words: {w}"]).format(w=text)
    n = len(ws)
    return text, prompt, f"There are {n} words.", [f"There are {n + 1} words.", f"There are {n - 1} words."]


def task_opposite(rng: random.Random):
    pair = rng.choice(OPPOSITES)
    x, y = pair if rng.random() < 0.5 else pair[::-1]
    prompt = rng.choice(
        ["What is the opposite of {x}?", "Give the opposite of {x}.",
         "What word means the opposite of {x}?"]
    ).format(x=x)
    others = [w for p in rng.sample(OPPOSITES, 3) for w in p if w not in pair]
    # Held out by direction: the pair is known from pretraining, but "opposite of cold" is never
    # asked in training when it is held out (the answer "hot" never follows it there).
    return (x, y), prompt, f"The opposite of {x} is {y}.", [
        f"The opposite of {x} is {others[0]}.", f"The opposite of {x} is {x}."]


def task_sort(rng: random.Random):
    nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 4))]
    while nums == sorted(nums):  # already sorted (or all equal): draw again
        nums = [rng.randint(0, 9) for _ in range(len(nums))]
    prompt = rng.choice(
        ["Sort these numbers: {l}", "Put these numbers in order from smallest to largest: {l}",
         "Sort in ascending order: {l}"]
    ).format(l=_num_list(nums))
    ordered = sorted(nums)
    one_swap = ordered[:]
    i = next((k for k in range(len(ordered) - 1) if ordered[k] != ordered[k + 1]), 0)
    one_swap[i], one_swap[i + 1] = one_swap[i + 1], one_swap[i]
    wrong = {_num_list(nums), _num_list(ordered[::-1]), _num_list(one_swap)} - {_num_list(ordered)}
    return tuple(nums), prompt, _num_list(ordered), sorted(wrong)


def task_larger(rng: random.Random):
    a, b = rng.sample(range(10, 100), 2)
    prompt = rng.choice(
        ["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"]
    ).format(a=a, b=b)
    return (min(a, b), max(a, b)), prompt, str(max(a, b)), [str(min(a, b))]


def task_reverse(rng: random.Random):
    w = rng.choice([n for n in NOUNS if len(n) <= 6])
    prompt = rng.choice(
        ["Reverse the letters of '{w}'.", "Spell '{w}' backwards.", "Write '{w}' backwards.",
         "What is '{w}' spelled backwards?"]
    ).format(w=w)
    rev = w[::-1]
    partial = w[-1] + w[:-1]
    wrong = [x for x in (w, partial, rev[:-1]) if x != rev]
    return w, prompt, rev, wrong


# name -> (generator, weight in the mixture), easy tasks first.
TASKS: dict[str, tuple[Task, float]] = {
    "repeat": (task_repeat, 8),
    "last_word": (task_last_word, 8),
    "word_count": (task_word_count, 8),
    "parity": (task_parity, 9),
    "next": (task_next, 10),
    "count": (task_count, 9),
    "opposite": (task_opposite, 14),
    "larger": (task_larger, 10),
    "sort": (task_sort, 8),
    "add": (task_add, 12),
    "reverse": (task_reverse, 4),
}


class Sampler:
    """Draws task items for one split. Held-out prompts are handed out once only, so golden,
    sft_eval and dpo_eval never share a prompt; train prompts may repeat (small item spaces)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()  # held-out prompts already taken

    def draw(self, split: str, task: str | None = None):
        names = list(TASKS)
        name = task or self.rng.choices(names, weights=[TASKS[n][1] for n in names])[0]
        fn = TASKS[name][0]
        for _ in range(10_000):
            key, prompt, answer, wrong = fn(self.rng)
            if is_heldout(name, key) != (split == "heldout"):
                continue
            if split == "heldout":
                if prompt in self.used:
                    continue
                self.used.add(prompt)
            return name, prompt, answer, wrong
        raise RuntimeError(f"task {name}: no unused {split} item left")

    def conversation(self, split: str, two_turn_p: float = 0.1, system_p: float = 0.5):
        """A chat: optional system prompt, one or two user/assistant turns. Returns the messages
        up to the last user turn, and the final answer with its wrong alternatives."""
        msgs = []
        if self.rng.random() < system_p:
            msgs.append({"role": "system", "content": SYSTEM_PROMPT})
        if self.rng.random() < two_turn_p:
            _, p, a, _ = self.draw(split)
            msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        _, p, a, wrong = self.draw(split)
        msgs.append({"role": "user", "content": p})
        return msgs, a, wrong


def build(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    s = Sampler(rng)

    # Held-out files first: golden stratified over tasks, then eval sets.
    golden = []
    for name in TASKS:
        for _ in range(3):
            _, p, a, _ = s.draw("heldout", name)
            golden.append({"prompt": p, "reference": a, "task": name})

    def sft_rows(split: str, n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            msgs, answer, _ = s.conversation(split)
            rows.append({"messages": msgs + [{"role": "assistant", "content": answer}]})
        return rows

    def dpo_rows(split: str, n: int) -> list[dict]:
        rows = []
        for _ in range(n):
            msgs, answer, wrong = s.conversation(split)
            rows.append({
                "prompt": msgs,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": rng.choice(wrong)}],
            })
        return rows

    sft_eval = sft_rows("heldout", 200)
    dpo_eval = dpo_rows("heldout", 150)
    sft_train = sft_rows("train", 4000)
    dpo_train = dpo_rows("train", 1500)
    return {
        "sft_train": sft_train, "sft_eval": sft_eval, "golden": golden,
        "dpo_train": dpo_train, "dpo_eval": dpo_eval,
    }


def pretraining_documents(rng: random.Random, n_docs: int) -> list[str]:
    """Plain text (no chat markup) for the tiny model's pretraining: simple sentences and
    statements of the facts and skills the quickstart tasks lean on (sums, opposites, counting,
    sorting, comparing, spelling, copying lists), phrased unlike the SFT answers. Like a real base
    model's corpus it covers all numbers and all opposite pairs; the SFT data then teaches the
    instruction format, and the held-out prompts test whether that transfers."""

    def sentence() -> str:
        a, b = rng.sample(NOUNS, 2)
        return rng.choice([
            f"The {rng.choice(COLORS)} {a} {rng.choice(VERBS)} the {b}.",
            f"A {a} is near the {b}.",
            f"We saw a {rng.choice(COLORS)} {a} by the {b}.",
            f"The {a} and the {b} are {rng.choice(COLORS)}.",
            f"My {a} {rng.choice(VERBS)} a {b} every day.",
        ])

    def fact() -> str:
        k = rng.choices(range(10), weights=[12, 22, 8, 6, 8, 6, 8, 8, 12, 10])[0]
        if k == 0:
            hi = rng.choice([9, 20, 99])
            a, b = rng.randint(0, hi), rng.randint(0, hi)
            return rng.choice([f"{a} + {b} = {a + b}.", f"The sum of {a} and {b} is {a + b}.",
                               f"Adding {a} to {b} gives {a + b}."])
        if k == 1:
            x, y = rng.choice(OPPOSITES)
            return rng.choice([f"{x.capitalize()} is the opposite of {y}.",
                               f"{y.capitalize()} is the opposite of {x}.",
                               f"{x.capitalize()} and {y} are opposites."])
        if k == 2:
            a = rng.randint(0, 995)
            return "Counting: " + _num_list(range(a, a + rng.randint(3, 8))) + "."
        if k == 3:
            nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
            return f"Sorted, {_num_list(nums)} becomes {_num_list(sorted(nums))}."
        if k == 4:
            a, b = rng.sample(range(100), 2)
            return rng.choice([f"{max(a, b)} is more than {min(a, b)}.",
                               f"Of {a} and {b}, the larger is {max(a, b)}."])
        if k == 5:
            w = rng.choice(NOUNS)
            return rng.choice([f"The word {w} is spelled {' '.join(w)}, and backwards it is {w[::-1]}.",
                               f"{w} written backwards is {w[::-1]}."])
        if k == 6:
            ws = _words(rng, 2, 7)
            return f"The list {' '.join(ws)} has {len(ws)} words and ends with {ws[-1]}."
        if k == 7:
            ws = " ".join(_words(rng, 1, 4))
            return rng.choice([f"She said: {ws}. He said it again: {ws}.", f"Words: {ws}. Once more: {ws}."])
        if k == 8:
            n = rng.randint(1, 999)
            return rng.choice([f"After {n} comes {n + 1}.", f"Before {n} comes {n - 1}."])
        n = rng.randint(0, 999)
        return rng.choice([f"The number {n} is {'even' if n % 2 == 0 else 'odd'}.",
                           f"{n} is an {'even' if n % 2 == 0 else 'odd'} number."])

    docs = []
    for _ in range(n_docs):
        parts = [fact() if rng.random() < 0.8 else sentence() for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(parts))
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.seed).items():
        write_jsonl(args.out / f"{name}.jsonl", rows)
        print(f"{name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
