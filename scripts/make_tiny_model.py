#!/usr/bin/env python
"""Build the embedded tiny chat model, lmpipeline/assets/tiny-chat, from scratch and offline.

    python scripts/make_quickstart_data.py   # first: the tokenizer is trained on its sft_train
    python scripts/make_tiny_model.py        # about 3 minutes on an idle 2-core CPU (1000 steps
                                             # at ~0.16 s); far longer if the cores are shared

1. Tokenizer: byte-level BPE trained with `tokenizers` on the quickstart SFT data plus the
   generated pretraining text; digits are split one per token so that arithmetic is learnable.
   ChatML special tokens, with a pad token distinct from EOS (EOS must never be hidden from the
   loss by padding): <|endoftext|>=0 (document separator, bos_token_id of the model config, as in
   Qwen2), <|im_start|>=1, <|im_end|>=2 (eos), <|pad|>=3.
2. Model: a 0.94M-parameter Llama (hidden 128, 4 layers, 4 heads, 2 KV heads, tied embeddings),
   random-initialised with a fixed seed, then briefly pretrained (full fine-tuning, fixed number
   of steps) on plain generated text (scripts/make_quickstart_data.py:pretraining_documents) so that
   it is a plausible base model: it has seen the facts the quickstart tasks use (sums, opposites,
   parity, counting), but never chat markup, so the untrained model scores 0 on the quickstart's
   exact-match eval and rambles on past the prompt.
3. The chat-special tokens never occur in pretraining. <|im_start|> and <|im_end|> get fixed-seed
   random embeddings of the trained rows' norm, so that a LoRA (which does not train embeddings)
   can learn to emit <|im_end|>; <|pad|> is zeroed.

Why pretrain at all: with random weights a LoRA learns almost nothing in a minute (eval loss
7.4 -> 5.9, exact match 0). A model this small cannot learn to copy from an arbitrary place in the
prompt (induction heads) within any CPU budget; make_quickstart_data.py designs the tasks for that.

Everything is seeded; rerunning on the same torch build and thread count reproduces the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_quickstart_data as qsdata  # noqa: E402  (sibling script: word lists, pretraining text)

OUT_DIR = ROOT / "lmpipeline" / "assets" / "tiny-chat"
DATA_DIR = ROOT / "examples" / "data" / "quickstart"
SEED = 1234
VOCAB_SIZE = 1536
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Standard ChatML (as Qwen2.5 uses), no BOS, no default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MODEL_SHAPE = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=352,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

# Pretraining: a fixed number of steps (not wall time) so that the weights are reproducible.
# Batch 16 x 128 tokens at a high rate beat 32 x 128 and 16 x 64 for the same compute here.
PRETRAIN = dict(docs=24_000, block=128, batch=16, steps=1000, lr=5e-3, warmup=50, min_lr_frac=0.1)


def sft_texts() -> list[str]:
    path = DATA_DIR / "sft_train.jsonl"
    if not path.exists():
        sys.exit(f"{path} not found: run scripts/make_quickstart_data.py first")
    texts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            # role names too, so that "assistant\n" etc. are short token runs in the template
            texts += [f"{m['role']}\n{m['content']}" for m in json.loads(line)["messages"]]
    return texts


def train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def pretrain(model: LlamaForCausalLM, ids: torch.Tensor, log_every: int = 50) -> None:
    p = PRETRAIN
    n_blocks = ids.numel() // p["block"]
    blocks = ids[: n_blocks * p["block"]].view(n_blocks, p["block"])
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < p["warmup"]:
            return p["lr"] * (step + 1) / p["warmup"]
        t = (step - p["warmup"]) / max(1, p["steps"] - p["warmup"])
        return p["lr"] * (p["min_lr_frac"] + (1 - p["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    start = time.time()
    for step in range(p["steps"]):
        batch = blocks[torch.randint(0, n_blocks, (p["batch"],), generator=gen)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == p["steps"] - 1:
            elapsed = time.time() - start
            print(f"  pretrain step {step:4d}  loss {loss.item():.3f}  {elapsed:5.1f}s", flush=True)
    model.eval()


def reset_unseen_embeddings(model: LlamaForCausalLM, chat_ids: list[int], pad_id: int) -> None:
    """Tokens never seen in pretraining drift (tied embeddings) to a shared 'never predict me'
    vector, which a LoRA that cannot touch embeddings would struggle to make the model emit.
    Give <|im_start|> and <|im_end|> fresh seeded random directions with the trained rows'
    typical norm, and zero <|pad|> (it is masked everywhere and must never look like a word)."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        seen = torch.ones(emb.shape[0], dtype=torch.bool)
        seen[chat_ids + [pad_id]] = False
        scale = emb[seen].norm(dim=-1).mean()
        gen = torch.Generator().manual_seed(SEED + 1)
        fresh = torch.randn(len(chat_ids), emb.shape[1], generator=gen)
        emb[chat_ids] = fresh / fresh.norm(dim=-1, keepdim=True) * scale
        emb[pad_id] = 0.0


README = """# tiny-chat

A {params_m:.2f}M-parameter Llama with a ChatML chat template, built offline by
`scripts/make_tiny_model.py` for lmpipeline's quickstart and tests. It is not a useful language
model: it exists so that SFT, DPO, evaluation, merging and packaging can run end to end on a CPU in
seconds, with no download.

- Architecture: LlamaForCausalLM, hidden {hidden_size}, {num_hidden_layers} layers,
  {num_attention_heads} heads ({num_key_value_heads} KV heads), MLP {intermediate_size},
  context {max_position_embeddings}, tied embeddings, float32; {params} parameters.
- Tokenizer: byte-level BPE, {vocab} tokens, trained on the quickstart SFT data and the generated
  pretraining text; digits are one token each. Special tokens: {specials}.
  eos_token is `<|im_end|>`, pad_token is `<|pad|>` (distinct from EOS), no BOS is added
  (as in Qwen2.5); `<|endoftext|>` separates pretraining documents and is the config's bos id.
- Chat template: standard ChatML, stored in tokenizer_config.json:
  `<|im_start|>{{role}}\\n{{content}}<|im_end|>\\n` per turn; add_generation_prompt appends
  `<|im_start|>assistant\\n`.
- Weights: seeded random init, then {steps} steps of full-parameter pretraining (batch {batch} x
  {block} tokens, AdamW lr {lr}, cosine) on plain text generated by
  `scripts/make_quickstart_data.py:pretraining_documents` (simple sentences and number, word and
  opposite facts; no chat markup; final pretraining loss {final_loss:.2f}). The chat special
  tokens are never seen in pretraining: `<|im_start|>` and `<|im_end|>` get seeded random
  embeddings of the trained rows' norm (so a LoRA can learn to emit `<|im_end|>`), `<|pad|>` zeros.
- All text is synthetic and written by the scripts; no third-party data or weights.

Rebuild: `python scripts/make_quickstart_data.py && python scripts/make_tiny_model.py`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--steps", type=int, default=PRETRAIN["steps"], help="pretraining steps (0: random init)")
    args = ap.parse_args()
    PRETRAIN["steps"] = args.steps
    torch.manual_seed(SEED)
    torch.set_num_threads(2)  # the reference CPU; results are reproducible for a fixed thread count

    t0 = time.time()
    docs = qsdata.pretraining_documents(random.Random(SEED), PRETRAIN["docs"])
    tokenizer = train_tokenizer(sft_texts() + docs)
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert list(specials.values()) == [0, 1, 2, 3], specials
    print(f"tokenizer: {len(tokenizer)} tokens, specials {specials}  ({time.time() - t0:.1f}s)")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=specials["<|endoftext|>"],
        eos_token_id=specials["<|im_end|>"],
        pad_token_id=specials["<|pad|>"],
        **MODEL_SHAPE,
    )
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    eot = specials["<|endoftext|>"]
    ids = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += enc + [eot]
    ids = torch.tensor(ids, dtype=torch.long)
    print(f"pretraining text: {len(docs)} documents, {ids.numel():,} tokens")
    final_loss = float("nan")
    if PRETRAIN["steps"] > 0:
        pretrain(model, ids)
        with torch.no_grad():
            tail = ids[-PRETRAIN["block"] * 8 :].view(8, -1)
            final_loss = model(input_ids=tail, labels=tail).loss.item()
    reset_unseen_embeddings(model, [specials["<|im_start|>"], specials["<|im_end|>"]], specials["<|pad|>"])

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out, save_jinja_files=False)  # template inside tokenizer_config.json
    (args.out / "README.md").write_text(
        README.format(
            params_m=n_params / 1e6, params=f"{n_params:,}", vocab=len(tokenizer),
            specials=", ".join(f"`{t}`={i}" for t, i in specials.items()), final_loss=final_loss,
            **MODEL_SHAPE, **{k: PRETRAIN[k] for k in ("steps", "batch", "block", "lr")},
        ),
        encoding="utf-8",
    )
    for f in args.out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600
    total = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
