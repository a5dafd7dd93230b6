"""Reading a stage's data cheaply for the estimate: the row count and a sample of token lengths.

Local files only, never the Hub; a tokenizer when one is at hand, else about four characters a token.
`data` is the family of formats the stage's method reads (Method.data: "supervised", "preference", "unpaired"):
preference rows count the prompt once and the longer reply; for an unpaired method (KTO) a pair is two
examples, the prompt with each reply.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from lmpipeline.data.readers import read_rows
from lmpipeline.plan.estimate import TokenProfile

CHARS_PER_TOKEN = 4.0  # English text through a Llama-3/Qwen/Mistral BPE: about 4 characters a token
TEMPLATE_TOKENS = 8  # chat-template markers a row adds (role headers, end-of-turn tokens)
SAMPLE_ROWS = 256


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):  # role names and type tags are template tokens, counted in TEMPLATE_TOKENS
        return [s for k, v in value.items() if k not in ("role", "from", "type", "name") for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _load_counter(tokenizer_path: str | None):
    """A token counter: the tokenizer when it is on disk, else characters / CHARS_PER_TOKEN."""
    folder = Path(str(tokenizer_path)).expanduser() if tokenizer_path else None
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if folder is not None and folder.is_dir() and any((folder / f).is_file() for f in files):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder))

            def count(text: str) -> int:
                return len(tok(text, add_special_tokens=False)["input_ids"])

            if count("Hello world, this is a test.") > 0:
                return count, f"tokenizer {tokenizer_path}"
        except Exception:  # noqa: BLE001 - no usable tokenizer there: fall back to the character rule
            pass
    return (lambda text: math.ceil(len(text) / CHARS_PER_TOKEN)), f"~{CHARS_PER_TOKEN:.0f} characters a token"


def _jsonl_sample(path, sample: int) -> tuple[int, list[dict]]:
    """(non-empty lines, up to `sample` rows at evenly spaced lines) of a plain JSONL file: two passes over
    the bytes, JSON-parsing only the sampled lines, so a multi-GB file costs seconds."""
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    wanted = {int(i * n / sample) for i in range(sample)} if n > sample else set(range(n))
    rows, i = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            if i in wanted:
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
            i += 1
    return n, rows


def profile_data(stage, data: str, tokenizer_path: str | None = None, sample: int = SAMPLE_ROWS) -> TokenProfile:
    """Rows and a length sample of a training stage's local data; an empty profile for Hub datasets."""
    spec = stage.dataset_name_or_path
    specs = [(spec, stage.dataset_split, stage.max_samples)] if isinstance(spec, str) else \
        [(s.path, s.split, s.max_samples) for s in (spec or [])]
    if not specs or not all(Path(str(p)).expanduser().exists() for p, _, _ in specs):
        return TokenProfile(source="data not readable here (Hub dataset or missing path): row lengths unknown")
    count, how = _load_counter(tokenizer_path)
    rng = random.Random(0)
    total = 0
    picked: list[dict] = []
    try:
        for path, split, cap in specs:
            p = Path(str(path)).expanduser()
            if p.is_file() and p.suffix in (".jsonl", ".ndjson"):
                n, rows = _jsonl_sample(p, sample)
                n = min(n, cap) if cap else n
                picked.extend(rows)
                total += n
                continue
            n = 0
            for _, row in read_rows(path, split=None if split == "train" else split, text_field=stage.dataset_text_field):
                if not isinstance(row, dict):
                    continue
                n += 1
                if len(picked) < sample:
                    picked.append(row)
                else:  # reservoir sampling keeps a uniform sample of every row read
                    j = rng.randrange(total + n)
                    if j < sample:
                        picked[j] = row
                if cap and n >= cap:
                    break
            total += n
    except Exception as e:  # noqa: BLE001 - the estimate must not fail on data the run would report anyway
        return TokenProfile(source=f"data could not be read for the estimate ({type(e).__name__}): row lengths unknown")
    if stage.max_samples:
        total = min(total, stage.max_samples)
    total = int(total * (1 - stage.validation_split_ratio)) if not stage.eval_dataset_name_or_path else total
    lengths, means, prompts = [], [], []
    pairs_read = 0
    for row in picked:
        if data in ("preference", "unpaired") and "chosen" in row and "rejected" in row:
            c = sum(count(s) for s in _strings(row["chosen"]))
            r = sum(count(s) for s in _strings(row["rejected"]))
            p = sum(count(s) for k, v in row.items() if k not in ("chosen", "rejected") for s in _strings(v))
            pairs_read += 1
            if data == "unpaired":  # two examples: the chosen (desirable) and the rejected (undesirable)
                lengths += [p + c + TEMPLATE_TOKENS, p + r + TEMPLATE_TOKENS]
                means += [p + c + TEMPLATE_TOKENS, p + r + TEMPLATE_TOKENS]
                continue
            lengths.append(p + max(c, r) + TEMPLATE_TOKENS)
            means.append(p + (c + r) / 2 + TEMPLATE_TOKENS)
            prompts.append(p)
        else:
            n = sum(count(s) for s in _strings(row)) + TEMPLATE_TOKENS
            lengths.append(n)
            means.append(n)
    if not lengths:
        return TokenProfile(rows=total, source="no rows read")
    if data == "unpaired" and picked:  # the sampled share of pair rows counts twice
        total = round(total * (1 + pairs_read / len(picked)))
    return TokenProfile(rows=total, mean_tokens=sum(means) / len(means), lengths=lengths,
                        prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
                        source=f"{len(picked)} sampled rows, {how}")


