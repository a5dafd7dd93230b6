"""Peak GPU memory and time of a training stage, from the model's shapes and the stage config, before any
weight is loaded (`lmpipeline estimate`, auto-fit, and the fit check that runs before loading weights).

Memory is the peak of `torch.cuda.max_memory_allocated()` (what the bench and the training loop report);
`hardware.required_bytes` adds the CUDA context and allocator headroom on top when deciding what fits.
The peak is the larger of two moments of an optimizer step:

    backward   static + saved activations + max(loss buffers, one layer's backward working set)
    optimizer  static + the optimizer's temporaries (foreach AdamW: one state-sized buffer)
    static     weights + LoRA adapters + gradients + optimizer state (+ a frozen reference copy for DPO)

Saved activations follow the autograd graph of a Hugging Face Llama-style decoder layer under bf16
autocast, tensor by tensor (`_layer_terms`; every term says which op saves it). The terms were checked
against torch.autograd.graph.saved_tensors_hooks on CPU for the same block (46.7 x hidden bytes per token
per layer for Llama-3.2-3B LoRA; `tests/unit/plan/test_estimate.py::test_layer_model_matches_autograd`
re-measures Llama, Qwen2, Qwen3, Phi-3 and Gemma-2 blocks in LoRA, dropout, fp32 and full fine-tuning
variants, padded and causal). With gradient checkpointing only each layer's input is kept (hidden x 2 bytes
per token) and one layer is recomputed at a time during the backward.

Calibration (`tests/unit/plan/test_calibration.py`): measured peaks of random Llama-3.2-3B runs, LoRA
and QLoRA, padded and packed, TRL's and lmpipeline's own code paths (the table of measured vs estimated
peaks is in bench/README.md, "Memory estimate calibration"); TRL rows are estimated with impl="trl".

The one fitted constant is a layer's backward working set (`BWD_TRANSIENT_*`), set on the packed
checkpointing rows; everything else is counted. TRL's QLoRA peaks sit ~0.3 GiB below its bf16 LoRA
peaks at equal tokens, more than the weights and the adapter-input sharing of bitsandbytes layers
explain, so TRL DPO QLoRA comes out 12% high (on the safe side). Unsloth's rows are not modelled (its
own kernels save different tensors).

`impl="lmpipeline"` (the default) describes this project's own code paths, which differ from TRL's:
- SFT computes the loss through the model (`labels=`), so full-vocabulary logits exist: bf16 logits,
  their float32 upcast and log-softmax (10-12 bytes per token per vocabulary entry) unless Liger's fused
  linear cross-entropy is on. For Llama-3's 128k vocabulary at 4,096 tokens that is 5.9 GiB.
- DPO scores completion positions through the LM head in chunks of 2^26 logits (methods/dpo.py).
- QLoRA/8-bit go through peft.prepare_model_for_kbit_training, which casts every non-quantised weight
  (embeddings, LM head, norms) to float32, so the residual stream and the MLP outputs of bitsandbytes
  layers are float32 too.

Time and suggestions are plan/timing.py's and plan/suggest.py's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

from lmpipeline.config.presets import Architecture
from lmpipeline.config.schema import padding_free_on, token_budget
from lmpipeline.models.loading import checkpointed_layer_indices
from lmpipeline.plan import hardware

GIB = hardware.GIB
IMPLS = ("lmpipeline", "trl")

# bitsandbytes NF4/FP4: 4 bits per weight plus one absmax per 64-weight block; double quantisation
# stores those absmax as 8-bit with one fp32 scale per 256 blocks (QLoRA paper, section 3).
NF4_BYTES = 0.5
ABSMAX_BYTES = 4 / 64
ABSMAX_DQ_BYTES = 1 / 64 + 4 / (64 * 256)
# LLM.int8: one byte per weight plus an fp32 scale per output row (added per module below).
INT8_BYTES = 1.0

# TRL's fused LM head (trl/kernels/chunked_logprob.py): [4096 tokens x 32768 vocab] bf16 tiles.
TRL_TILE_TOKENS, TRL_TILE_VOCAB = 4096, 32768
# lmpipeline's chunked loss (methods/logprobs.LOGIT_CHUNK_ELEMENTS, kept equal by a test; this module
# does not import torch): chunks of 2^25 logits.
OURS_LOSS_CHUNK_ELEMENTS = 1 << 25
# A layer's backward working set beyond its saved tensors (gradients of its activations in flight),
# bytes per token: fitted to the packed 2 x 2048 checkpointing runs (7.87 GiB, 7.71 with Liger).
BWD_TRANSIENT_HIDDEN = 4
BWD_TRANSIENT_INTERMEDIATE = 8



# ----------------------------------------------------------------------------------------------
# What the estimate needs to know about the data


@dataclass
class TokenProfile:
    """Row lengths of a stage's data in tokens, from a sample when the data could be read."""

    rows: int | None = None
    mean_tokens: float | None = None  # mean tokens a row puts through the model (DPO: per chosen/rejected row)
    prompt_tokens: float | None = None  # DPO: mean tokens of a pair's prompt (counted in both of its rows)
    lengths: list[int] | None = None  # sample of the row lengths that set padded widths
    source: str = "no data sample: rows assumed max_seq_length long (worst case)"

    def longest(self, rows_seen: int, cap: int) -> int:
        """Median of the longest of `rows_seen` rows (what the peak micro-batch is padded to), capped."""
        if not self.lengths:
            return cap
        data = sorted(min(int(x), cap) for x in self.lengths if x > 0)
        if not data:
            return cap
        q = 0.5 ** (1.0 / max(1, rows_seen))
        if (1 - q) * len(data) >= 1:
            return min(cap, data[min(len(data) - 1, int(q * len(data)))])
        # Beyond the sample: a lognormal fitted to it (prompt and answer lengths are close to lognormal).
        logs = [math.log(x) for x in data]
        mu = sum(logs) / len(logs)
        sd = math.sqrt(sum((v - mu) ** 2 for v in logs) / max(1, len(logs) - 1))
        z = NormalDist().inv_cdf(q)
        return int(min(cap, max(data[-1], math.exp(mu + z * sd))))

    def mean(self, cap: int) -> float:
        if self.mean_tokens:
            return float(min(self.mean_tokens, cap))
        if self.lengths:
            return sum(min(int(x), cap) for x in self.lengths) / len(self.lengths)
        return float(cap)

    def largest_sum(self, rows: int, batches_seen: int, cap: int) -> int:
        """Median (over resamplings) of the largest total length of `rows` rows among `batches_seen`
        micro-batches: the peak micro-batch of a padding-free layout. rows x cap without a sample."""
        if not self.lengths:
            return rows * cap
        data = [min(int(x), cap) for x in self.lengths if x > 0]
        rng = random.Random(0)
        draws = max(1, min(batches_seen, 2000))
        peaks = sorted(max(sum(rng.choice(data) for _ in range(rows)) for _ in range(draws)) for _ in range(21))
        return peaks[len(peaks) // 2]

    def padding_inflation(self, batch: int, cap: int) -> float:
        """Computed / real tokens of padded micro-batches of `batch` rows (1.0 without a sample)."""
        if not self.lengths or batch <= 1:
            return 1.0
        data = [min(int(x), cap) for x in self.lengths]
        rng = random.Random(0)
        padded = real = 0
        for _ in range(400):
            rows = [rng.choice(data) for _ in range(batch)]
            padded += max(rows) * batch
            real += sum(rows)
        return padded / max(real, 1)


# ----------------------------------------------------------------------------------------------
# The training set-up, reduced to what decides memory


@dataclass(frozen=True)
class EstimatorTerms:
    """How a method's micro-batch turns into model rows and passes, for plan/estimate.py.

    rows_per_unit       rows the model runs per item of the micro-batch (a DPO pair: chosen + rejected)
    unit                what per_device_train_batch_size counts ("row" or "pair"), for messages
    packs_rows          whether `packing:` applies (bins of several examples in one row)
    varlen_by_default   its rows sit end to end under varlen attention whenever the kernel runs
    shares_prompt       `share_prompt:` applies: under varlen a pair's prompt runs once
    scores_completions  the loss reads only completion positions through the LM head (no full logits)
    no_grad_rows        further policy rows per unit run without gradients (KTO's KL rows: a forward
                        each, no activations kept)
    reference_rows      rows the reference runs per unit (None: the trained rows, as DPO's pair)
    lm_head             whether the rows go through the LM head over the vocabulary (False: a reward
                        model's score head, one number per position)
    """

    rows_per_unit: int = 1
    unit: str = "row"
    packs_rows: bool = False
    varlen_by_default: bool = False
    shares_prompt: bool = False
    scores_completions: bool = False
    no_grad_rows: int = 0
    reference_rows: int | None = None
    lm_head: bool = True

    def forward_factor(self, reference: str) -> float:
        """Forwards beside the trained rows', per trained row: the policy's rows without gradients and
        the reference's rows (none when precomputed or reference-free). A forward is 2N FLOPs per token."""
        ref = self.rows_per_unit if self.reference_rows is None else self.reference_rows
        ref = ref if reference in ("adapter_disabled", "frozen_copy") else 0
        return (self.no_grad_rows + ref) / self.rows_per_unit


SFT_TERMS = EstimatorTerms()  # one row per item, the model's own loss: what a Setup assumes unless told


@dataclass(frozen=True)
class Setup:
    terms: EstimatorTerms = SFT_TERMS  # the method's (lmpipeline/methods: Method.terms)
    micro_batch: int = 1  # items (rows, or pairs of two rows: terms.rows_per_unit)
    grad_accum: int = 1
    seq_len: int = 2048
    packing: bool = False  # SFT bins of seq_len tokens
    padding_free: bool = False  # rows end to end without padding (SFT padding_free; DPO under varlen)
    shared_prompt: bool = False  # DPO under varlen with share_prompt: a pair's prompt runs once, not twice
    micro_batch_tokens: int | None = None  # a step's rows regrouped into micro-batches of at most this many tokens
    gradient_checkpointing: bool = False
    checkpoint_fraction: float = 1.0  # share of the layers checkpointed when gradient_checkpointing is on
    use_lora: bool = True
    lora_r: int = 16
    lora_targets: Any = "all-linear"
    lora_dropout: float = 0.0
    use_dora: bool = False
    quant: str = "none"  # none | 4bit | 8bit
    double_quant: bool = True
    weight_bytes: int = 2  # dtype the (non-quantised) weights are loaded in
    autocast: bool = True  # bf16/fp16 mixed precision
    optim: str = "adamw_torch"
    liger: bool = False
    compiled: bool = False  # torch_compile: decoder layers through Inductor (Liger then patches only the loss)
    attn: str = "sdpa"  # sdpa | flash_attention_2 | flex_attention | eager
    reference: str = "none"  # the method's reference model: adapter_disabled | frozen_copy | precomputed | none
    impl: str = "lmpipeline"
    loss_path: str = "auto"  # auto | full_logits (force the model's own logits, e.g. DPO's logits path)
    dropout_mask_bytes: int = 1  # CUDA's native_dropout keeps a bool mask (the CPU kernel a float one)

    @property
    def rows(self) -> int:
        return self.micro_batch * self.terms.rows_per_unit


def setup_from_stage(stage, method, *, torch_dtype: str = "auto", impl: str = "lmpipeline",
                     arch: Architecture | None = None, **overrides) -> Setup:
    """The Setup of a training stage config (auto values must be resolved or overridden). `method`: the
    stage's Method (lmpipeline/methods), for its estimator terms and the reference the config runs with."""
    quant = "4bit" if stage.use_4bit else "8bit" if stage.use_8bit else "none"
    # An unresolved `bf16: auto` is planned as the GPU case: bf16 (autofit.resolve_precision).
    if torch_dtype in ("bfloat16", "float16"):
        weight_bytes = 2
    elif torch_dtype == "float32":
        weight_bytes = 4
    else:
        weight_bytes = 2 if (stage.bf16 or stage.fp16) else 4
    terms = method.terms
    reference = method.reference_for(stage)
    attn = _attention(stage, terms, arch)
    batch = stage.per_device_train_batch_size
    gc = stage.gradient_checkpointing
    packing = bool(stage.packing) and terms.packs_rows
    # Varlen rows carry no padding: DPO pairs always, SFT with padding_free (packing fills its bins anyway).
    padding_free = attn == "varlen" and not packing
    micro_batch = batch if isinstance(batch, int) else 1
    budget = token_budget(getattr(stage, "micro_batch_tokens", None), micro_batch, stage.max_seq_length,
                          rows_per_item=terms.rows_per_unit)
    values = dict(
        terms=terms, micro_batch=micro_batch, grad_accum=stage.gradient_accumulation_steps,
        seq_len=stage.max_seq_length, packing=packing, padding_free=padding_free, micro_batch_tokens=budget,
        shared_prompt=terms.shares_prompt and attn == "varlen" and getattr(stage, "share_prompt", False),
        gradient_checkpointing=gc if isinstance(gc, bool) else False,
        checkpoint_fraction=getattr(stage, "gradient_checkpointing_fraction", 1.0), use_lora=stage.use_lora,
        lora_r=stage.lora_r, lora_targets=stage.lora_target_modules, lora_dropout=stage.lora_dropout,
        use_dora=stage.use_dora, quant=quant, double_quant=stage.bnb_4bit_use_double_quant,
        weight_bytes=weight_bytes, autocast=bool(stage.bf16 or stage.fp16), optim=stage.optim,
        # torch_compile: auto is planned eager (it depends on the run's length; eager needs more memory)
        liger=stage.use_liger_kernel, compiled=getattr(stage, "torch_compile", False) is True, attn=attn,
        reference=reference, impl=impl,
        loss_path="auto" if getattr(stage, "chunked_loss", True) else "full_logits")
    values.update(overrides)
    return Setup(**values)


def _without_flash_kernel(setup: Setup, stage) -> Setup:
    """`setup` on a GPU without PyTorch's flash varlen kernel (before compute capability 8.0): SDPA, DPO
    pairs and padding_free: auto padded, an explicit padding_free row under SDPA's block mask."""
    if setup.attn != "varlen":
        return setup
    explicit = not setup.terms.varlen_by_default and getattr(stage, "padding_free", False) is True
    return replace(setup, attn="sdpa", padding_free=explicit, shared_prompt=False)


def _attention(stage, terms: EstimatorTerms, arch: Architecture | None) -> str:
    """The attention a run of `stage` uses on a GPU (models/attention.attention_for's rule): varlen for
    packed SFT rows, padding-free SFT and every DPO stage unless another backend is named or the
    architecture needs what the kernel lacks (soft-capping, a sliding window shorter than a row)."""
    requested = stage.attn_implementation
    if requested not in (None, "auto", "varlen", "lmp_varlen"):
        return requested
    softcap = arch is not None and arch.attn_softcap
    window = arch is not None and arch.sliding_window and arch.sliding_window < stage.max_seq_length
    # padding_free auto counts as on: the estimate is for a GPU, where the kernel runs (unless NEFTune is on).
    # packing and padding_free are SFT's (terms.packs_rows); the other methods pad unless varlen_by_default.
    packed = terms.varlen_by_default or (terms.packs_rows and (stage.packing or padding_free_on(stage, varlen_runs=True)))
    if packed and not softcap and not window:
        return "varlen"
    return "eager" if softcap else "sdpa"


# ----------------------------------------------------------------------------------------------
# Parameters


def adapted_modules(arch: Architecture, targets) -> list[tuple[str, int, int, bool]]:
    """The linear modules of a layer that LoRA wraps ("all-linear": every one; PEFT leaves lm_head out)."""
    mods = arch.linear_modules()
    if targets in (None, "all-linear", "all_linear"):
        return mods
    names = [targets] if isinstance(targets, str) else list(targets)
    return [m for m in mods if m[0] in names or any(n.endswith(m[0]) for n in names)]


def lora_params(arch: Architecture, setup: Setup) -> int:
    if not setup.use_lora:
        return 0
    per = sum(setup.lora_r * (i + o) for _, i, o, _ in adapted_modules(arch, setup.lora_targets))
    if setup.use_dora:
        per += sum(o for _, _, o, _ in adapted_modules(arch, setup.lora_targets))
    return per * arch.num_layers


def _weights(arch: Architecture, setup: Setup) -> tuple[float, str]:
    L = arch.num_layers
    linear = L * arch.linear_params_per_layer
    rest = L * (arch.bias_params_per_layer + arch.norm_params_per_layer) + arch.hidden_size
    embed = arch.embedding_params + arch.lm_head_params
    if setup.quant == "none":
        total = (linear + rest + embed) * setup.weight_bytes
        dt = {2: "bf16/fp16", 4: "fp32"}[setup.weight_bytes]
        return total, f"{_n(arch.total_params)} parameters in {dt}"
    # Embeddings, LM head, norms and biases are not quantised (bitsandbytes replaces nn.Linear layers
    # only and skips the output embedding). They stay in their loaded dtype: lmpipeline skips peft's
    # float32 upcast (models/loading.prepare_kbit_model) and TRL keeps them bf16.
    other_bytes = 2
    if setup.quant == "4bit":
        per = NF4_BYTES + (ABSMAX_DQ_BYTES if setup.double_quant else ABSMAX_BYTES)
        q = linear * per
        what = f"NF4 {_g(q)} ({per:.3f} B/weight incl. absmax{' double-quantised' if setup.double_quant else ''})"
    else:
        q = linear * INT8_BYTES + L * sum(o for _, _, o, _ in arch.linear_modules()) * 4
        what = f"int8 {_g(q)} (1 B/weight + row scales)"
    unq = (embed + rest) * other_bytes
    return q + unq, f"{what} + embeddings/norms bf16 {_g(unq)}"


def _optimizer_bytes_per_param(optim: str, param_bytes: int) -> tuple[float, str]:
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        # bitsandbytes blockwise 8-bit: one byte per moment (+ an fp32 absmax per 2048 values).
        return 2 + 8 / 2048, "8-bit AdamW (2 B/param)" + (", paged: may spill to CPU memory" if "paged" in optim else "")
    if optim == "paged_adamw_32bit":
        return 8.0, "paged 32-bit AdamW (8 B/param; may spill to CPU memory)"
    if optim == "sgd":
        return 0.0, "SGD without momentum (no state)"
    if optim == "adafactor":
        return 0.0, "Adafactor (factored second moment, counted per matrix)"
    # torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype.
    return 2.0 * param_bytes, f"AdamW m+v in {'fp32' if param_bytes == 4 else 'bf16'} ({2 * param_bytes} B/param)"


# ----------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class Flow:
    """Dtypes and code paths of one decoder layer's forward, which decide what autograd saves."""

    resid: int  # bytes of the residual stream (2 in a bf16 model; 4 in fp32 or after the kbit upcast)
    act: int  # bytes of matmul/attention outputs under autocast (2), or 4 without autocast
    mlp_out: int  # bytes of gate/up outputs: bitsandbytes layers return their input's dtype
    lora: bool
    dropout: bool
    full_ft: bool
    liger: bool  # Liger's RMSNorm and SwiGLU in the layers
    compiled: bool
    gqa_native: bool  # k/v saved at KV-head width (flash, flex, or SDPA without a mask)
    masked: bool  # SDPA gets a 4D mask (padding, or packed rows' block-diagonal mask)
    eager: bool
    uncast: bool = False  # LoRA inputs reach lora_A uncast (no per-module copy)


def _flow(setup: Setup) -> Flow:
    fp32_model = setup.weight_bytes == 4 and setup.quant == "none"
    # peft's prepare_model_for_kbit_training upcasts norms and embeddings to fp32; lmpipeline skips that
    # (models/loading.prepare_kbit_model) and TRL keeps them bf16, so the stream stays bf16.
    resid = 4 if fp32_model else 2
    act = 2 if (setup.autocast or setup.weight_bytes == 2) else 4
    mlp_out = resid if setup.quant != "none" else act
    masked = setup.attn in ("sdpa", "eager") and (setup.packing or setup.rows > 1 or setup.terms.rows_per_unit > 1)
    # lmpipeline trains with PEFT's input casts off under autocast (models/speedups.py): a LoRA layer's
    # bf16 input is saved once per group of modules reading it, as for bitsandbytes layers.
    uncast = setup.impl == "lmpipeline" and setup.autocast
    return Flow(resid=resid, act=act, mlp_out=mlp_out, lora=setup.use_lora,
                dropout=setup.use_lora and setup.lora_dropout > 0, full_ft=not setup.use_lora,
                liger=setup.liger and not setup.compiled, compiled=setup.compiled,
                gqa_native=setup.attn in ("flash_attention_2", "flash_attention_3", "flex_attention", "varlen")
                or not masked, uncast=uncast,
                masked=masked and setup.attn == "sdpa", eager=setup.attn == "eager")


def _layer_terms(arch: Architecture, setup: Setup, ctx_len: int) -> dict[str, float]:
    """Bytes autograd saves per token in one decoder layer (no checkpointing), by source."""
    f = _flow(setup)
    H, I, Q, KV = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    a = f.act
    t: dict[str, float] = {}
    # RMSNorm (HF): x.to(float32) is saved by pow/mul (4 bytes/elem whatever the input dtype); a
    # trainable weight also saves the normalised input for its gradient. Liger's RMSNorm saves x + rstd,
    # and so does Inductor's fused one (compiled layers: 17.93 vs 21.25 GiB eager on the H100 for packed
    # 2 x 2048 Llama-3.2-3B, about the two norms' float32 copies; the MLP's saved tensors did not shrink).
    per_norm = (f.resid if (f.liger or f.compiled) else 4) * H + ((4 if arch.norm_fp32_math else f.resid) * H if f.full_ft else 0)
    t["norms"] = arch.norms_per_layer * per_norm
    if arch.qk_norm:  # Qwen3: the same on every query and key head
        t["norms"] += (4 + (a if f.full_ft else 0)) * (Q + KV)
    # Inputs the linear layers save. Frozen base weights save no input (autograd keeps only what the
    # weight's gradient would need); LoRA's A matrix saves its input; full fine-tuning saves each input once.
    adapted = {m[0] for m in adapted_modules(arch, setup.lora_targets)} if f.lora else set()
    if arch.fused_qkv:
        groups = [("qkv_proj",), ("o_proj",), ("gate_up_proj",), ("down_proj",)]
    else:
        groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    in_dim = {"q_proj": H, "k_proj": H, "v_proj": H, "qkv_proj": H, "o_proj": Q, "gate_proj": H, "up_proj": H,
              "gate_up_proj": H, "down_proj": I}
    in_bytes = {"o_proj": a, "down_proj": f.mlp_out}
    bnb = setup.quant != "none"
    proj = 0.0
    for group in groups:
        d = in_dim[group[0]]
        xb = in_bytes.get(group[0], 4 if f.resid == 4 else a)  # a norm's output dtype
        # o_proj reads the attention output, which SDPA/flash already saved (same storage, a view).
        shared_with_attention = group[0] == "o_proj" and not f.eager
        if f.full_ft:
            proj += 0 if shared_with_attention else xb * d
            continue
        hit = [m for m in group if m in adapted]
        if not hit:
            continue
        # lora_B saves lora_A's output (r values per token and module).
        proj += len(hit) * setup.lora_r * (2 if setup.autocast else 4)
        if f.dropout:
            # Each module saves its own dropped-out input (bf16 under autocast) and the dropout mask
            # (bool on CUDA: native_dropout; the CPU kernel keeps a float mask).
            proj += len(hit) * (max(xb, 2 if setup.autocast else 4) + setup.dropout_mask_bytes) * d
            continue
        # PEFT casts a plain nn.Linear's input to the adapter dtype (fp32) and autocast then casts it to
        # bf16 for lora_A: a new tensor per module. Under autocast bitsandbytes layers skip PEFT's cast
        # (peft/tuners/lora/bnb.py), so only an fp32 input is copied. Without autocast only a non-fp32
        # input is cast (to fp32); an fp32 input is shared by the modules that read it.
        if setup.autocast and xb != 4 and (f.uncast or bnb):
            # The bf16 input reaches lora_A as it is (our casts off; bitsandbytes layers skip PEFT's cast):
            # saved once for the modules of the group that read it.
            if not shared_with_attention:
                proj += xb * d
        elif setup.autocast:
            # PEFT casts each module's input to fp32 and autocast casts it back to bf16 for lora_A (an
            # fp32 input is cast by autocast alone): a new bf16 tensor per module.
            proj += len(hit) * 2 * d
        elif xb != 4:
            proj += len(hit) * 4 * d
        elif not shared_with_attention:
            proj += 4 * d
    t["linear inputs"] = proj
    # Attention. SDPA/flash save q, k, v, the output and the log-sum-exp; with a mask transformers'
    # SDPA path repeats k/v to all heads first (use_gqa_in_sdpa is False when a mask is passed) and
    # SDPA saves the float mask it converts the boolean one to. Eager attention saves q and the repeated
    # k (for the scores), the softmax in fp32 and its copy in the compute dtype, the tanh-capped scores
    # (Gemma-2) and the repeated v.
    kv_width = KV if f.gqa_native else Q
    if f.eager:
        per_score = 4 + a + (a if arch.attn_softcap else 0)
        attn = a * Q + 2 * a * Q + arch.num_heads * ctx_len * per_score
    else:
        attn = a * Q + 2 * a * kv_width + a * Q + 4 * arch.num_heads
    if arch.fused_qkv and (kv_width == KV or arch.num_kv_heads == arch.num_heads):
        attn += a * (Q + KV)  # Phi-3: v is a view of the fused qkv output, which stays alive whole
    if f.masked:
        attn += a * ctx_len
    t["attention"] = attn
    # MLP (SwiGLU/GeGLU): the activation saves its input (gate output), the product saves both factors
    # (up output and act(gate)). Liger's fused SwiGLU saves the two projections and recomputes the rest.
    t["mlp"] = (2 if f.liger else 3) * f.mlp_out * I
    return t


def layer_constant_bytes(arch: Architecture, setup: Setup) -> float:
    """Per-layer saved bytes that do not grow with tokens: autocast's bf16 copies of the fp32 LoRA weights."""
    if not (setup.use_lora and setup.autocast):
        return 0.0
    return sum(2 * setup.lora_r * (i + o) for _, i, o, _ in adapted_modules(arch, setup.lora_targets))


def checkpointed_layers(n_layers: int, setup: Setup) -> int:
    """How many decoder layers a run of `setup` checkpoints."""
    if not setup.gradient_checkpointing:
        return 0
    return len(checkpointed_layer_indices(n_layers, setup.checkpoint_fraction))


def layer_activation_bytes(arch: Architecture, setup: Setup, ctx_len: int | None = None) -> float:
    """Saved bytes per token of one decoder layer without checkpointing (see _layer_terms)."""
    return sum(_layer_terms(arch, setup, ctx_len or setup.seq_len).values())


def _loss_bytes(arch: Architecture, setup: Setup, tokens: int, positions: int) -> tuple[float, str]:
    """Bytes the loss holds at its own peak (logits and their gradients), for `tokens` in the micro-batch
    and `positions` scored through the LM head."""
    V, H = arch.vocab_size, arch.hidden_size
    if not setup.terms.lm_head:  # a score head: [tokens, 1] fp32 logits and their gradient
        return 8.0 * tokens, "score head (one number per position)"
    head_fp32 = False  # the LM head stays in the compute dtype (see _flow)
    cast = 0
    if setup.liger and not setup.terms.scores_completions:
        # Liger fused linear cross-entropy: chunks of next_pow2(tokens / ceil(V/H)) rows in fp32, and
        # the input gradient (tokens x hidden) computed in the forward.
        chunk = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(V / H))))))
        return 6 * chunk * V + 2 * tokens * H + cast, f"Liger fused linear cross-entropy ({chunk}-row chunks)"
    fused_ok = arch.final_softcap is None and setup.loss_path != "full_logits"
    if setup.impl == "trl" and fused_ok:
        rows = min(positions, TRL_TILE_TOKENS)
        return 2 * rows * TRL_TILE_VOCAB + 4 * positions * H + 32 * positions, "TRL fused LM head (4096 x 32768 tiles)"
    if fused_ok and (setup.terms.scores_completions or setup.impl == "lmpipeline"):
        # methods/logprobs.TokenLogps: trained / completion positions only, in chunks (SFT: chunked_loss)
        rows = max(1, OURS_LOSS_CHUNK_ELEMENTS // V)
        n = min(positions, rows)
        # per chunk: bf16 logits, their fp32 copy and the softmax gradient (+ its fp32 cast for an fp32 head)
        per = 16 if head_fp32 else 12
        return per * n * V + 4 * positions * H + cast, f"chunked completion log-probs ({rows}-row chunks)"
    # Full logits: bf16 logits + float32 upcast + log-softmax in the forward (10 B), and in the backward
    # the saved log-softmax, its incoming gradient and its input gradient (12 B), per token x vocabulary.
    return 12.0 * tokens * V + cast, f"full logits {V:,} x {tokens:,} tokens (fp32 upcast + log-softmax)"


# ----------------------------------------------------------------------------------------------
# The estimate


@dataclass
class MemoryEstimate:
    """Peak allocated bytes of one training step, split by what holds them at that moment."""

    parts: dict[str, float]
    details: dict[str, str]
    peak: float
    phase: str
    tokens: int  # tokens in the peak micro-batch (padding included)
    row_len: int  # padded row length of that micro-batch
    trainable: int
    notes: list[str] = field(default_factory=list)
    off_peak: dict[str, float] = field(default_factory=dict)  # candidates that were not the maximum

    @property
    def required(self) -> float:
        return hardware.required_bytes(self.peak)

    def as_dict(self) -> dict:
        return {"peak_gib": round(self.peak / GIB, 3), "required_gib": round(self.required / GIB, 3),
                "phase": self.phase, "tokens_per_micro_batch": self.tokens,
                "parts_gib": {k: round(v / GIB, 3) for k, v in self.parts.items()}, "trainable": self.trainable}


def estimate_memory(arch: Architecture, setup: Setup, profile: TokenProfile | None = None,
                    rows_seen: int | None = None) -> MemoryEstimate:
    """Peak allocated GPU memory of one step of `setup` on `arch` (one device; DDP replicates it)."""
    profile = profile or TokenProfile()
    L, H, I = arch.num_layers, arch.hidden_size, arch.intermediate_size
    notes: list[str] = []
    details: dict[str, str] = {}

    # Static: weights, adapters, gradients, optimizer state.
    weights, details["weights"] = _weights(arch, setup)
    n_lora = lora_params(arch, setup)
    if setup.use_lora:
        trainable, param_bytes = n_lora, 4  # PEFT keeps adapters in fp32 (autocast_adapter_dtype=True)
        adapters = n_lora * 4
        details["LoRA adapters"] = f"{_n(n_lora)} trainable parameters in fp32"
    else:
        trainable, param_bytes = arch.total_params, setup.weight_bytes
        adapters = 0.0
        if setup.weight_bytes == 2:
            notes.append("full fine-tuning of bf16 weights: AdamW state and updates in bf16 (no fp32 master copy)")
    grads = trainable * param_bytes
    details["gradients"] = f"{_n(trainable)} x {param_bytes} B"
    per_param, opt_what = _optimizer_bytes_per_param(setup.optim, param_bytes)
    optim = trainable * per_param
    if setup.optim == "adafactor":
        mats = adapted_modules(arch, setup.lora_targets) if setup.use_lora else arch.linear_modules()
        factored = sum((setup.lora_r + i) + (setup.lora_r + o) if setup.use_lora else i + o for _, i, o, _ in mats)
        optim = 4 * L * factored + (0 if setup.use_lora else 4 * (arch.embedding_params + arch.lm_head_params) / H * 2)
    details["optimizer"] = opt_what
    reference = 0.0
    if setup.reference == "frozen_copy":
        reference = weights
        details["reference model"] = "frozen copy of the starting weights (full fine-tuning)"
    static = weights + adapters + grads + optim + reference

    # Tokens of the peak micro-batch: packed rows are full; padded rows are as long as the longest row.
    # (A DPO prompt shared by its pair's two rows is counted in both: the peak stays an upper bound.)
    rows = setup.rows
    seen = rows_seen or (profile.rows or 10**6)
    row_len = setup.seq_len if setup.packing else profile.longest(seen, setup.seq_len)
    tokens = rows * row_len
    if setup.padding_free:  # no padding: the largest micro-batch is the largest sum of real lengths
        tokens = profile.largest_sum(rows, max(1, seen // rows), setup.seq_len)
    if setup.micro_batch_tokens:  # the step's rows regrouped: micro-batches fill up to the budget
        step_rows = rows * setup.grad_accum
        if setup.packing:
            step_tokens = step_rows * setup.seq_len
        elif setup.padding_free:
            step_tokens = profile.largest_sum(step_rows, max(1, seen // step_rows), setup.seq_len)
        else:
            step_tokens = step_rows * row_len
        tokens = min(setup.micro_batch_tokens, step_tokens)
    # transformers flattens our packed micro-batch into one [1, rows x len] row with a block mask.
    ctx = tokens if (setup.packing or setup.padding_free) else row_len
    flow = _flow(setup)
    terms = _layer_terms(arch, setup, ctx)
    per_layer = sum(terms.values())
    ckpt = flow.resid * H  # each checkpointed layer keeps only its input
    head_in = (4 + flow.act) * H  # final norm (fp32 copy) and the LM head's input
    bwd = (BWD_TRANSIENT_HIDDEN * H + BWD_TRANSIENT_INTERMEDIATE * I) * (flow.act // 2 if flow.act > 2 else 1)
    positions = tokens  # positions scored through the head (completion-only paths score fewer)
    loss, loss_what = _loss_bytes(arch, setup, tokens, positions)
    const = layer_constant_bytes(arch, setup)
    if setup.gradient_checkpointing:
        Lc = checkpointed_layers(L, setup)
        saved = (Lc * ckpt + (L - Lc) * per_layer + head_in) * tokens + (L - Lc) * const
        layer_work = (per_layer + bwd) * tokens + const
        act_what = f"{Lc} checkpointed layer inputs {_g(Lc * ckpt * tokens)}"
        if Lc < L:
            act_what += f" + {L - Lc} layers kept whole {_g((L - Lc) * (per_layer * tokens + const))}"
        work_what = f" + one layer recomputed with its gradients {_g(layer_work)}"
    else:
        saved = (L * per_layer + head_in) * tokens + L * const
        layer_work = bwd * tokens
        act_what = f"{L} layers x {per_layer / H:.1f} x hidden bytes per token"
        work_what = f" + gradients in flight {_g(layer_work)}"
    if layer_work >= loss:
        activations, loss_part, backward_phase = saved + layer_work, 0.0, "backward (a layer's gradients)"
        off = {"logits/loss": loss}
        act_what += work_what
    else:
        activations, loss_part, backward_phase = saved, loss, "backward (the loss over the vocabulary)"
        off = {"layer backward": layer_work}
    details["activations"] = act_what
    details["logits/loss"] = loss_what
    if setup.quant != "none":
        # bitsandbytes dequantises one weight at a time to the compute dtype for the matmul.
        activations += 2 * max(i * o for _, i, o, _ in arch.linear_modules())
    if setup.use_dora:
        notes.append("DoRA builds each adapted weight (W + BA) to take its norm: a weight-sized temporary per module")
        activations += 6 * max(i * o for _, i, o, _ in adapted_modules(arch, setup.lora_targets))
    backward_peak = static + activations + loss_part

    # The optimizer step: foreach AdamW makes one state-sized temporary (torch/optim/adamw.py).
    step_tmp = trainable * param_bytes if setup.optim in ("adamw_torch", "adamw", "adamw_torch_fused") else 0
    step_peak = static + step_tmp
    parts = {"weights": weights, "LoRA adapters": adapters, "gradients": grads, "optimizer": optim,
             "reference model": reference}
    if step_peak > backward_peak:
        parts["optimizer temporaries"] = step_tmp
        peak, phase = step_peak, "optimizer step"
        off = {"activations": activations + loss_part}
    else:
        parts["activations"] = activations
        parts["logits/loss"] = loss_part
        peak, phase = backward_peak, backward_phase
    parts = {k: v for k, v in parts.items() if v > 0}

    if setup.packing and setup.attn == "sdpa":
        notes.append("packed rows on SDPA use a dense block-diagonal mask (slow, and its memory is counted); "
                     "attn_implementation: varlen (the default for packing on a GPU) avoids it")
    if not setup.terms.scores_completions and setup.loss_path == "full_logits" and not setup.liger and loss > 0.25 * peak:
        notes.append(f"full-vocabulary logits cost {_g(loss)} here: chunked_loss: true scores the trained "
                     "positions in chunks")
    if setup.reference == "adapter_disabled":
        notes.append("reference = the model with its adapter disabled: no second copy, one extra no-grad forward "
                     "of its rows")
    notes.extend(arch.notes)
    return MemoryEstimate(parts, details, peak, phase, tokens, row_len, trainable, notes, off)


# ----------------------------------------------------------------------------------------------
# Helpers for reports


def _g(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def _n(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n:,.0f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "unknown"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def rows_seen(stage, profile: TokenProfile) -> int | None:
    """Rows the run draws (what the longest padded micro-batch depends on)."""
    b = stage.per_device_train_batch_size if isinstance(stage.per_device_train_batch_size, int) else 1
    by_steps = stage.max_steps * b * stage.gradient_accumulation_steps if stage.max_steps > 0 else None
    by_rows = int(profile.rows * max(1.0, stage.num_train_epochs)) if profile.rows else None
    if by_steps and by_rows:
        return min(by_steps, by_rows)
    return by_steps or by_rows
