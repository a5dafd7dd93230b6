"""Named benchmark settings: what each engine runs, on top of the common hyper-parameters.

Common to every setting (the peer measurement's, GUIDE section 5): LoRA r16 on the 7 projections
(alpha 16 for SFT, 32 for DPO; dropout 0), adamw_8bit, bf16, seed 3407, one log line per step.
SFT lr 2e-4; DPO lr 5e-5, beta 0.1, max length 1024, reference = the model with its adapter off.

`batch` x `ga` is the same global batch within a kind unless the name says otherwise, so loss curves
are comparable across settings and engines.
"""

from __future__ import annotations

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SFT_COMMON = dict(lora_r=16, lora_alpha=16, lora_dropout=0.0, lora_target_modules=TARGETS, learning_rate=2e-4,
                  optim="adamw_8bit", bf16=True, seed=3407)
DPO_COMMON = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=TARGETS, learning_rate=5e-5,
                  beta=0.1, optim="adamw_8bit", bf16=True, seed=3407, max_seq_length=1024)

def _ours(batch: int, ga: int, checkpointing: bool, **options) -> dict:
    """SFTConfig/DPOConfig fields of one of our settings. The micro-batches run as named (micro_batch_tokens
    off, padded unless padding_free or packing is named) unless the setting says otherwise: the names say
    batch x GA, and the earlier rows were measured so, before regrouping and padding_free: auto became
    the defaults. Layers run eager unless the setting compiles them: a bench run is shorter than the 300
    steps from which `torch_compile: auto` compiles, and the -compile rows show what such a run gets."""
    options.setdefault("micro_batch_tokens", None)
    options.setdefault("padding_free", False)
    options.setdefault("torch_compile", False)
    return dict(per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                gradient_checkpointing=checkpointing, **options)


def _dpo(batch: int, ga: int, checkpointing: bool, **options) -> dict:
    """A DPO setting of ours. The prompt is read once per sequence (share_prompt off) unless the setting
    shares it: the rows before 2026-12-03's shared-prompt layout were measured so."""
    options.setdefault("share_prompt", False)
    return _ours(batch, ga, checkpointing, **options)


def _trl(batch: int, ga: int, checkpointing: bool, **options) -> dict:
    """Our names for TRL's options, translated in measure.run_trl (packing, liger, use_4bit)."""
    return dict(batch=batch, ga=ga, gradient_checkpointing=checkpointing, **options)


def _qlora_shared_compiled(budget: int) -> tuple[str, dict]:
    return (f"QLoRA NF4, 2 pairs x GA 4 regrouped into micro-batches of at most {budget:,} tokens, prompt shared, "
            "checkpointing, reference precomputed, torch.compile",
            _dpo(2, 4, True, **NF4, precompute_ref_log_probs=True, torch_compile=True,
                 micro_batch_tokens=budget, share_prompt=True))


PACKED = dict(packing=True)
COMPILED = dict(packing=True, torch_compile=True)
NF4 = dict(use_4bit=True)

# name -> (description, settings)
SFT = {
    "ours": {
        "packed": ("packing 2 x 2048, varlen attention, no checkpointing (TRL's best setting, ours)",
                   _ours(2, 4, False, **PACKED)),
        "packed-bs4": ("packing 4 x 2048 x GA 2, varlen, no checkpointing", _ours(4, 2, False, **PACKED)),
        "packed-liger": ("packing 2 x 2048, varlen, Liger kernels, no checkpointing",
                         _ours(2, 4, False, **PACKED, use_liger_kernel=True)),
        "packed-compile": ("packing 2 x 2048, varlen, torch.compile of the decoder layers, no checkpointing",
                           _ours(2, 4, False, **COMPILED)),
        "packed-liger-compile": ("packing 2 x 2048, varlen, Liger, torch.compile of the layers, no checkpointing",
                                 _ours(2, 4, False, **COMPILED, use_liger_kernel=True)),
        "packed-bs4-compile": ("packing 4 x 2048 x GA 2, varlen, torch.compile, no checkpointing",
                               _ours(4, 2, False, **COMPILED)),
        "packed-ckpt-compile": ("packing 2 x 2048, varlen, torch.compile, checkpointing (lean)",
                                _ours(2, 4, True, **COMPILED)),
        "packed-bs4-liger-compile": ("packing 4 x 2048 x GA 2, varlen, torch.compile, Liger's fused loss",
                                     _ours(4, 2, False, **COMPILED, use_liger_kernel=True)),
        "packed-bs4-ckpt25-compile": ("packing 4 x 2048 x GA 2, varlen, torch.compile, a quarter of the layers "
                                      "checkpointed", _ours(4, 2, True, **COMPILED, gradient_checkpointing_fraction=0.25)),
        "packed-ckpt-liger-compile": ("packing 2 x 2048, varlen, torch.compile, Liger's fused loss, checkpointing "
                                      "(lean)", _ours(2, 4, True, **COMPILED, use_liger_kernel=True)),
        "packed-bs4-liger": ("packing 4 x 2048 x GA 2, varlen, Liger, no checkpointing",
                             _ours(4, 2, False, **PACKED, use_liger_kernel=True)),
        "packed-ckpt-liger": ("packing 2 x 2048, varlen, Liger, checkpointing (lean)",
                              _ours(2, 4, True, **PACKED, use_liger_kernel=True)),
        "packed-ckpt": ("packing 2 x 2048, varlen, checkpointing (lean)", _ours(2, 4, True, **PACKED)),
        "padded-ckpt": ("no packing, padded 2 x GA 4, checkpointing (seed example layout)", _ours(2, 4, True)),
        "qlora-seed": ("QLoRA NF4, no packing, padded 2 x GA 4, checkpointing (the seed example as written)",
                       _ours(2, 4, True, **NF4)),
        "qlora-seed-logits": ("QLoRA NF4, padded 2 x GA 4, checkpointing, the model's own loss over full logits",
                              _ours(2, 4, True, **NF4, chunked_loss=False)),
        "qlora-padfree": ("QLoRA NF4, 2 x GA 4 examples padding-free (varlen), checkpointing",
                          _ours(2, 4, True, **NF4, padding_free=True)),
        "qlora-seed-compile": ("QLoRA NF4, padded 2 x GA 4, checkpointing, torch.compile of the decoder layers",
                               _ours(2, 4, True, **NF4, torch_compile=True)),
        "qlora-padfree-compile": ("QLoRA NF4, 2 x GA 4 examples padding-free (varlen), checkpointing, torch.compile",
                                  _ours(2, 4, True, **NF4, padding_free=True, torch_compile=True)),
        "qlora-tokens-compile": ("QLoRA NF4, 2 x GA 4 examples regrouped into micro-batches of at most 2,048 "
                                 "tokens (micro_batch_tokens), padding-free, checkpointing, torch.compile",
                                 _ours(2, 4, True, **NF4, padding_free=True, torch_compile=True,
                                       micro_batch_tokens=2048)),
        "qlora-tokens-auto-compile": ("QLoRA NF4, 2 x GA 4 examples regrouped into micro-batches of at most 2 x "
                                      "2,048 tokens (micro_batch_tokens: auto), padding-free, checkpointing, "
                                      "torch.compile", _ours(2, 4, True, **NF4, padding_free=True, torch_compile=True,
                                                             micro_batch_tokens="auto")),
        "qlora-auto": ("QLoRA NF4, no packing, global batch 8 with micro-batch and checkpointing auto-fitted",
                       dict(**NF4, per_device_train_batch_size="auto", global_batch_size=8,
                            gradient_checkpointing="auto", micro_batch_tokens=None, padding_free=False)),
        "qlora-seed-defaults": ("QLoRA NF4, the seed's 2 x GA 4 with checkpointing, and lmpipeline's defaults "
                                "(padding_free: auto, micro_batch_tokens: auto regroups each step's 8 rows; eager, as "
                                "torch_compile: auto leaves a run this short)",
                                _ours(2, 4, True, **NF4, micro_batch_tokens="auto", padding_free="auto")),
        "qlora-seed-defaults-compile": ("QLoRA NF4, the seed's 2 x GA 4 with checkpointing, lmpipeline's defaults, "
                                        "torch.compile", _ours(2, 4, True, **NF4, micro_batch_tokens="auto",
                                                               padding_free="auto", torch_compile=True)),
        "qlora-packed-compile": ("QLoRA NF4, packing 2 x 2048 x GA 4, varlen, torch.compile, checkpointing",
                                 _ours(2, 4, True, **NF4, **COMPILED)),
        "qlora-packed-ckpt": ("QLoRA NF4, packing 2 x 2048 x GA 4, varlen, checkpointing",
                              _ours(2, 4, True, **NF4, **PACKED)),
    },
    "trl": {
        "best": ("TRL packing 2 x 2048 + Liger, no checkpointing (the best peer setting, 12,459 tok/s)",
                 _trl(2, 4, False, packing=True, liger=True)),
        "packed-ckpt-liger": ("TRL packing 2 x 2048 + Liger, checkpointing", _trl(2, 4, True, packing=True, liger=True)),
        "qlora-seed": ("TRL QLoRA NF4, no packing, 2 x GA 4, checkpointing (666 tok/s)", _trl(2, 4, True, **NF4)),
    },
}

DPO = {
    "ours": {
        "seed": ("bf16 LoRA, 2 pairs x GA 4, checkpointing (the peer setting; pairs packed, varlen)",
                 _dpo(2, 4, True)),
        "fast": ("bf16 LoRA, 8 pairs x GA 1, no checkpointing (same global batch)", _dpo(8, 1, False)),
        "fast-precomputed": ("bf16 LoRA, 8 pairs x GA 1, no checkpointing, reference log-probs precomputed",
                             _dpo(8, 1, False, precompute_ref_log_probs=True)),
        "qlora-seed": ("QLoRA NF4, 2 pairs x GA 4, checkpointing (pairs packed, varlen)", _dpo(2, 4, True, **NF4)),
        "qlora-precomputed": ("QLoRA NF4, 4 pairs x GA 2, checkpointing, reference precomputed",
                              _dpo(4, 2, True, **NF4, precompute_ref_log_probs=True)),
        "qlora-seed-compile": ("QLoRA NF4, 2 pairs x GA 4, checkpointing, torch.compile of the decoder layers",
                               _dpo(2, 4, True, **NF4, torch_compile=True)),
        "qlora-precomputed-compile": ("QLoRA NF4, 4 pairs x GA 2, checkpointing, reference precomputed, torch.compile",
                                      _dpo(4, 2, True, **NF4, precompute_ref_log_probs=True, torch_compile=True)),
        "qlora-precomputed-2x4-compile": ("QLoRA NF4, 2 pairs x GA 4, checkpointing, reference precomputed, "
                                          "torch.compile", _dpo(2, 4, True, **NF4, precompute_ref_log_probs=True,
                                                                torch_compile=True)),
        "qlora-tokens-2048": ("QLoRA NF4, 2 pairs x GA 4 regrouped into micro-batches of at most 2,048 tokens, "
                              "checkpointing, reference precomputed (eager)",
                              _dpo(2, 4, True, **NF4, precompute_ref_log_probs=True, micro_batch_tokens=2048)),
        "qlora-tokens-2048-compile": ("QLoRA NF4, 2 pairs x GA 4 regrouped into micro-batches of at most 2,048 "
                                      "tokens, checkpointing, reference precomputed, torch.compile",
                                      _dpo(2, 4, True, **NF4, precompute_ref_log_probs=True, torch_compile=True,
                                           micro_batch_tokens=2048)),
        "qlora-tokens-3072-compile": ("QLoRA NF4, 2 pairs x GA 4 regrouped into micro-batches of at most 3,072 "
                                      "tokens, checkpointing, reference precomputed, torch.compile",
                                      _dpo(2, 4, True, **NF4, precompute_ref_log_probs=True, torch_compile=True,
                                           micro_batch_tokens=3072)),
        "qlora-seed-defaults": ("QLoRA NF4, the seed's 2 pairs x GA 4 with checkpointing, and lmpipeline's "
                                "defaults (varlen, prompt shared, micro_batch_tokens: auto; eager, as "
                                "torch_compile: auto leaves a run this short)",
                                _dpo(2, 4, True, **NF4, micro_batch_tokens="auto", share_prompt=True)),
        "qlora-shared-2048": ("QLoRA NF4, 2 pairs x GA 4 regrouped into micro-batches of at most 2,048 tokens, "
                              "prompt shared by chosen and rejected, checkpointing, reference precomputed (eager)",
                              _dpo(2, 4, True, **NF4, precompute_ref_log_probs=True, micro_batch_tokens=2048,
                                   share_prompt=True)),
        # The shared-prompt QLoRA row at several micro-batch token budgets (the 3.5 GiB target's memory
        # moves with the budget; bench/README.md, 2026-12-03 calls 16-21).
        **{f"qlora-shared-{budget}-compile": _qlora_shared_compiled(budget) for budget in (2048, 3072, 3328, 3584)},
        "qlora-shared-auto-compile": ("QLoRA NF4, 2 pairs x GA 4 regrouped into micro-batches of at most 4,096 "
                                      "tokens (auto), prompt shared, checkpointing, reference precomputed, "
                                      "torch.compile", _dpo(2, 4, True, **NF4, precompute_ref_log_probs=True,
                                                            torch_compile=True, micro_batch_tokens="auto",
                                                            share_prompt=True)),
        "fast-shared": ("bf16 LoRA, 8 pairs x GA 1, no checkpointing, reference precomputed, prompt shared",
                        _dpo(8, 1, False, precompute_ref_log_probs=True, share_prompt=True)),
    },
    "trl": {
        "seed": ("TRL bf16 LoRA, 2 pairs x GA 4, checkpointing (2.55 pairs/s)", _trl(2, 4, True)),
        "qlora-seed": ("TRL QLoRA NF4, 2 pairs x GA 4, checkpointing (2.06 pairs/s)", _trl(2, 4, True, **NF4)),
    },
}

KINDS = {"sft": SFT, "dpo": DPO}


def lookup(kind: str, engine: str, name: str) -> tuple[str, dict]:
    table = KINDS[kind][engine]
    if name not in table:
        raise ValueError(f"no {engine} {kind} setting {name!r}; choose from {sorted(table)}")
    return table[name]
