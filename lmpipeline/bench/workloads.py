"""Benchmark models and data: random weights of real architectures, synthetic token streams.

Models: the architecture configs shipped in lmpipeline/config/model_configs/ with random weights (speed
and memory do not depend on the values) and a word-level tokenizer in which the word "w<i>" is token
i, so token ids and text map one to one and TRL (which takes text for DPO) sees the same tokens as we do.

Data, as in the peer measurement (../shared/bench/sft_anchor_bench.py, dpo_anchor_bench.py; GUIDE
section 5), numpy default_rng(seed):
- SFT "alpaca": 3,000 rows, lengths lognormal(median 200, sigma 0.7) clipped to 16..2048, each row
  [bos] + random ids + [eos], every token trained (the anchor trains on whole rows).
- SFT "long": the long-context variant, lengths lognormal(median 2048, sigma 0.5) clipped to 256..8192.
- SFT "short": 256-token rows for CPU smoke runs (tests), not a benchmark workload.
- DPO: prompt lognormal(150, 0.7) clipped 8..512, chosen and rejected lognormal(220, 0.7) clipped
  8..512, one token per word, each completion ending in eos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmpipeline.config.presets import MODEL_CONFIG_DIR, resolve_architecture

# bench name -> architecture config folder ("tiny": the embedded test model's shapes, for CPU runs)
ARCHITECTURES = {
    "llama-3.2-1b": MODEL_CONFIG_DIR / "llama-3.2-1b",  # the 200-step loss-curve comparison
    "llama-3.2-3b": MODEL_CONFIG_DIR / "llama-3.2-3b",
    "llama-3.1-8b": MODEL_CONFIG_DIR / "llama-3.1-8b",
    "qwen2.5-0.5b": MODEL_CONFIG_DIR / "qwen2.5-0.5b-instruct",
    "tiny": Path(__file__).resolve().parents[1] / "assets" / "tiny-chat",
}
LENGTHS = {
    "alpaca": dict(median=200, sigma=0.7, lo=16, hi=2048, rows=3000, max_seq_length=2048),
    "long": dict(median=2048, sigma=0.5, lo=256, hi=8192, rows=600, max_seq_length=8192),
    # CPU smoke runs (tests): 256-token rows, so attention over a packed row costs 64x less than at 2048.
    "short": dict(median=48, sigma=0.5, lo=8, hi=256, rows=300, max_seq_length=256),
}
FIRST_WORD_ID = 5  # ids below are left to special tokens, as in the anchor


@dataclass(frozen=True)
class Specials:
    bos: int
    eos: int
    pad: int
    vocab: int


def architecture(name: str):
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown bench model {name!r}; choose from {sorted(ARCHITECTURES)}")
    return resolve_architecture(str(ARCHITECTURES[name]))


def _config(name: str) -> dict:
    return json.loads((ARCHITECTURES[name] / "config.json").read_text())


def specials(name: str) -> Specials:
    cfg = _config(name)
    vocab = int(cfg["vocab_size"])
    # Three reserved ids at the top of the vocabulary: bos, eos, pad (real models keep specials there).
    return Specials(bos=vocab - 3, eos=vocab - 2, pad=vocab - 1, vocab=vocab)


def word_limit(sp: Specials) -> int:
    """Ordinary word ids are FIRST_WORD_ID .. word_limit - 1."""
    return sp.vocab - 256


def make_tokenizer(name: str, folder: Path):
    """A word-level tokenizer: "w<i>" -> i; specials at the top of the vocabulary. Saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = specials(name)
    vocab = {f"w{i}": i for i in range(sp.vocab)}
    vocab.update({"<bos>": sp.bos, "<eos>": sp.eos, "<pad>": sp.pad})
    for i in (sp.bos, sp.eos, sp.pad):
        vocab.pop(f"w{i}", None)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(folder)
    return tok


def make_model(name: str, folder: Path, *, seed: int = 0) -> Path:
    """Random bf16 weights of architecture `name` (on the GPU when there is one) and the tokenizer, saved
    as safetensors to `folder`. Skipped when the folder already holds them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sp = specials(name)
    config = AutoConfig.from_pretrained(ARCHITECTURES[name])
    config.bos_token_id, config.eos_token_id, config.pad_token_id = sp.bos, sp.eos, sp.pad
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer(name, folder)
    return folder


def sft_rows(name: str, lengths: str = "alpaca", *, rows: int | None = None, seed: int = 0) -> list[list[int]]:
    """Token rows of the SFT workload (module docstring)."""
    spec, sp = LENGTHS[lengths], specials(name)
    rng = np.random.default_rng(seed)
    n = rows or spec["rows"]
    lens = np.clip(rng.lognormal(np.log(spec["median"]), spec["sigma"], n).astype(int), spec["lo"], spec["hi"])
    hi = word_limit(sp)
    return [[sp.bos] + rng.integers(FIRST_WORD_ID, hi, int(m) - 2).tolist() + [sp.eos] for m in lens]


def preference_rows(name: str, pairs: int, *, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of the DPO workload; completions end in eos."""
    sp = specials(name)
    rng = np.random.default_rng(seed)
    hi = word_limit(sp)

    def words(median: int) -> list[int]:
        n = int(np.clip(rng.lognormal(np.log(median), 0.7), 8, 512))
        return rng.integers(FIRST_WORD_ID, hi, n).tolist()

    out = []
    for _ in range(pairs):
        prompt, chosen, rejected = words(150), words(220), words(220)
        out.append((prompt, chosen + [sp.eos], rejected + [sp.eos]))
    return out


def as_text(ids: list[int]) -> str:
    """The words of `ids` (the tokenizer maps them back to the same ids)."""
    return " ".join(f"w{i}" for i in ids)
