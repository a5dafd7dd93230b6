"""How long a training stage takes, from FLOPs: FLOPs per token = k x N (N = weights every token multiplies
through, LM head included; k = 4 for LoRA: forward + backward to activations; 6 for full fine-tuning; +2
with checkpointing; a reference forward adds 2 per token unless precomputed), attention FLOPs not counted,
at DEFAULT_MFU of the GPU's attainable matmul rate. Padded batches are charged for their padding, and
micro-batches under FULL_MFU_TOKENS run at proportionally lower MFU (fitted to the bench: 749 tokens/s
unpadded vs 8,099 packed, same model and GPU). QLoRA runs at 0.89 of that. Treat times as +-50%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmpipeline.config.presets import Architecture
from lmpipeline.plan import hardware
from lmpipeline.plan.estimate import Setup, TokenProfile, checkpointed_layers

DEFAULT_MFU = 0.20  # the best peer measured reaches 20% of the H100's attainable 790 TFLOP/s (bench/README.md)
FULL_MFU_TOKENS = 4096  # micro-batches smaller than this run at proportionally lower MFU
MIN_MFU = 0.02
QUANT_SPEED = {"none": 1.0, "4bit": 0.89, "8bit": 0.5}  # 8-bit: LLM.int8 matmuls, rough




@dataclass
class TimeEstimate:
    flops_per_token: float
    tokens_per_epoch: float | None
    steps_per_epoch: int | None
    total_steps: int | None
    total_tokens: float | None
    tokens_per_second: float
    seconds_per_epoch: float | None
    seconds_total: float | None
    mfu: float
    basis: str

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def estimate_time(arch: Architecture, setup: Setup, device: hardware.GPU, profile: TokenProfile | None = None, *,
                  epochs: float = 1.0, max_steps: int = -1, world: int = 1, mfu: float = DEFAULT_MFU) -> TimeEstimate:
    profile = profile or TokenProfile()
    # A reward model's score head replaces the vocabulary head: its tokens skip V x H multiplies.
    N = arch.matmul_params - (0 if setup.terms.lm_head else arch.vocab_size * arch.hidden_size)
    recompute = checkpointed_layers(arch.num_layers, setup) / max(arch.num_layers, 1)  # share of layers run twice
    k = (4 if setup.use_lora else 6) + 2 * recompute
    flops_per_token = (k + 2 * setup.terms.forward_factor(setup.reference)) * N
    mean = profile.mean(setup.seq_len)
    if setup.shared_prompt and profile.prompt_tokens:  # each row carries half of its pair's one prompt
        mean -= profile.prompt_tokens / 2
    rows_per_step = setup.rows * setup.grad_accum * world
    inflation = 1.0 if setup.packing else profile.padding_inflation(setup.rows, setup.seq_len)
    micro_tokens = setup.micro_batch * setup.seq_len if setup.packing else setup.rows * mean * inflation
    if setup.micro_batch_tokens:  # regrouped: as many rows of the step as the budget holds
        micro_tokens = min(setup.micro_batch_tokens, micro_tokens * setup.grad_accum)
    eff = mfu * QUANT_SPEED.get(setup.quant, 1.0) * min(1.0, micro_tokens / FULL_MFU_TOKENS)
    eff = max(eff, MIN_MFU * QUANT_SPEED.get(setup.quant, 1.0))
    computed_per_s = eff * device.matmul_tflops * 1e12 / flops_per_token
    tokens_per_s = computed_per_s / inflation
    if profile.rows:
        n_rows = profile.rows * setup.terms.rows_per_unit
        tokens_per_epoch = n_rows * mean
        if setup.packing:
            steps = math.ceil(tokens_per_epoch / (setup.micro_batch * setup.seq_len * 0.97) / (setup.grad_accum * world))
        else:
            steps = math.ceil(n_rows / rows_per_step)
        basis = f"{profile.rows:,} rows x {mean:,.0f} tokens ({profile.source})"
    else:
        tokens_per_epoch, steps = None, None
        basis = "dataset size unknown"
    if max_steps and max_steps > 0:
        total_steps = max_steps
        if setup.packing:
            per_step = setup.micro_batch * setup.seq_len * 0.97 * setup.grad_accum * world
        else:
            per_step = rows_per_step * mean
        total_tokens = total_steps * per_step
        if not profile.rows and not profile.lengths:
            basis = f"max_steps {max_steps} x {rows_per_step} rows x {setup.seq_len} tokens (upper bound: row lengths unknown)"
        elif not profile.rows:
            basis = f"max_steps {max_steps} x {rows_per_step} rows x {mean:,.0f} tokens ({profile.source})"
    elif tokens_per_epoch is not None:
        total_steps = math.ceil(epochs * steps)
        total_tokens = epochs * tokens_per_epoch
    else:
        total_steps, total_tokens = None, None
    return TimeEstimate(
        flops_per_token=float(flops_per_token), tokens_per_epoch=tokens_per_epoch, steps_per_epoch=steps,
        total_steps=total_steps, total_tokens=total_tokens, tokens_per_second=tokens_per_s,
        seconds_per_epoch=tokens_per_epoch / tokens_per_s / world if tokens_per_epoch else None,
        seconds_total=total_tokens / tokens_per_s / world if total_tokens else None,
        mfu=eff, basis=basis)
