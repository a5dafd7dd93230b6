"""Log-probabilities of chosen tokens without the [tokens, vocab] logits: shared by every method.

`token_logps(model, inputs, targets_mask, targets)` runs the model for its last hidden states and
scores only the selected positions through the LM head, a chunk of rows at a time (TokenLogps),
in float32. Used when `fused_head_usable(model)`: the logits are exactly lm_head(hidden state).
For Llama-3-sized vocabularies this is what keeps a 4,096-token micro-batch from holding ~6 GiB of
fp32 logits (plan/estimate.py's logits/loss term).

Completion log-probs (`completion_logps`, `packed_completion_logps`): the summed log-prob of each
sequence's completion tokens, padded rows or sequences end to end under varlen attention; what every
preference method compares. `choose_logps_path` picks the fused path when it gives the model's logits.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

from lmpipeline.data.packing import flash_attn_kwargs

log = logging.getLogger(__name__)

def unwrap(model):
    """The module under DDP/accelerate wrappers (they keep it in `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def accepts_logits_to_keep(model) -> bool:
    inner = unwrap(model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


# Logits computed at once by the fused path: 2^25 (261 rows of a 128k vocabulary, 128 MiB of float32;
# with the bf16 logits and the softmax gradient about 0.4 GiB at the loss's peak). 2^26 set the peak of
# QLoRA runs on Llama-3.2-3B (bench/README.md); a 261-row matmul still runs at full speed.
# plan/estimate.py counts the same figure (a test ties the two).
LOGIT_CHUNK_ELEMENTS = 1 << 25
# Config fields of architectures whose logits are not lm_head(hidden): they take the logits path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier")


class TokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[target] for N selected positions, a chunk of rows at a time:
    the [N, vocab] logits are never held whole, neither in the forward nor in the backward. Matmuls run
    under the autocast state of the forward, log-softmax in float32. The idea of TRL's fused LM head and
    of Liger's fused linear cross-entropy; written here because TRL is a test dependency only and its
    head is bound to patching the model's forward.

    Backward, two ways (d logp / d logits = onehot(target) - softmax):
    - frozen head (LoRA, QLoRA: the usual case): each output depends on its own row of `hidden` only,
      so d out_i / d hidden_i is one vector per row, computed in the forward from the chunk's logits
      while they exist and kept instead of `hidden` (same size). Backward is a multiply: no second
      pass through the vocabulary (one [N, hidden] x [hidden, vocab] matmul and a softmax saved).
    - trained head or bias (full fine-tuning): the weight gradient needs every row's softmax against
      the upstream gradient, which is only known in backward, so backward recomputes each chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        device = hidden.device.type
        ctx.autocast = torch.is_autocast_enabled(device)
        ctx.autocast_dtype = torch.get_autocast_dtype(device)
        ctx.chunk = chunk
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        head_trained = weight.requires_grad or (bias is not None and bias.requires_grad)
        # Rows' own gradients, when only `hidden` needs one (head frozen).
        jacobian = torch.empty_like(hidden) if ctx.needs_input_grad[0] and not head_trained else None
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s:s + chunk], weight, bias).float()
            lse[s:s + chunk] = logits.logsumexp(dim=-1)
            out[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
            if jacobian is not None:
                jacobian[s:s + chunk] = _row_gradients(logits, lse[s:s + chunk], targets[s:s + chunk], weight)
        if jacobian is not None:
            ctx.save_for_backward(jacobian)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.precomputed = jacobian is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.precomputed:
            (jacobian,) = ctx.saved_tensors
            return (jacobian * grad_out[:, None].to(jacobian.dtype)), None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        chunk = ctx.chunk
        with torch.autocast(hidden.device.type, dtype=ctx.autocast_dtype, enabled=ctx.autocast):
            for s in range(0, hidden.shape[0], chunk):
                h, go = hidden[s:s + chunk], grad_out[s:s + chunk].float()
                logits = F.linear(h, weight, bias).float()
                g = _logit_gradients(logits, lse[s:s + chunk], targets[s:s + chunk]).mul_(go[:, None])
                if need_h:
                    grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += g.t() @ h.float()
                if need_b:
                    grad_b += g.sum(dim=0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None)


def _logit_gradients(logits, lse, targets):
    """d log_softmax(logits)[target] / d logits = onehot(target) - softmax, float32, in place of `logits`."""
    g = torch.exp_(logits.sub_(lse[:, None])).neg_()
    g[torch.arange(g.shape[0], device=g.device), targets] += 1.0
    return g


def _row_gradients(logits, lse, targets, weight):
    """d logp_i / d hidden_i for each row: (onehot - softmax) @ weight, in weight's dtype as the recomputing
    backward produces it (its autocast matmul casts the float32 factor to weight's dtype the same way)."""
    return _logit_gradients(logits, lse, targets).to(weight.dtype) @ weight


def fused_head_usable(model) -> bool:
    """True when the model's logits are exactly lm_head(last hidden state) through a plain Linear head
    (so the fused path computes what the model would), else the logits path is used."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not accepts_logits_to_keep(model):
        return False
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not any(getattr(text, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)


def _decoder(model):
    """The model's decoder stack (the part before the LM head), or None when it cannot be told apart."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not base else None


def final_hidden_states(model, inputs: dict) -> torch.Tensor:
    """The hidden states the LM head reads (after the final norm), [rows, length, hidden].

    With gradients off (evaluation, a DPO reference pass) the decoder stack runs alone: asking the whole
    model for output_hidden_states keeps every layer's output alive until it returns, 29 x tokens x
    hidden for Llama-3.2-3B, 1.35 GiB at 8 DPO pairs: what set the peak of a QLoRA precompute pass
    (bench/README.md). With gradients on, the call goes through `model` (DDP's hooks must see it) with
    one kept logit, and a hook on the decoder takes its output: not output_hidden_states, whose per-layer
    hooks break compiled layers into pieces (models/compile.py sets them aside while compiled).
    """
    if not torch.is_grad_enabled():
        decoder = _decoder(model)
        if decoder is not None:
            return decoder(**inputs, use_cache=False).last_hidden_state
    return forward_with_final_hidden(model, inputs)[1]


def forward_with_final_hidden(model, inputs: dict):
    """`model(**inputs)` with one kept logit, and the final hidden states [rows, length, hidden] taken
    from the decoder's output by a hook (output_hidden_states as the fallback)."""
    decoder = _decoder(model)
    if decoder is None:
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        return out, out.hidden_states[-1]
    captured = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        out = model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return out, captured[-1]


def hidden_token_logps(model, inputs: dict, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) at the positions where `mask` ([rows, length-1], position t predicts t+1) is
    true, through the fused head: a 1-D tensor in the order of mask.nonzero()."""
    hidden = final_hidden_states(model, inputs)[:, :-1][mask]
    head = unwrap(model).get_output_embeddings()
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
    return TokenLogps.apply(hidden, head.weight, head.bias, targets[mask], chunk)


def completion_logps(model, input_ids, attention_mask, completion_mask, *, fused: bool = False,
                     logits_to_keep: bool = True):
    """(summed log-prob over completion tokens [rows], completion length [rows]) for each row.

    Position t predicts token t+1. The fused path (`fused=True`, see fused_head_usable) takes the
    last hidden states and scores only completion positions in chunks (TokenLogps): no
    [rows, length, vocab] logits exist at any time. The logits path asks the model for logits from
    the position before the earliest completion token onwards (`logits_to_keep`) and reads them with
    cross_entropy. Both take log-probs in float32 whatever the model dtype.
    """
    mask = completion_mask[:, 1:].bool()
    if fused:
        hidden = final_hidden_states(model, {"input_ids": input_ids, "attention_mask": attention_mask})[:, :-1][mask]
        head = unwrap(model).get_output_embeddings()
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
        token = TokenLogps.apply(hidden, head.weight, head.bias, input_ids[:, 1:][mask], chunk)
        rows = mask.nonzero()[:, 0]
        logps = torch.zeros(input_ids.shape[0], dtype=token.dtype, device=token.device).index_add(0, rows, token)
        return logps, mask.sum(dim=-1)
    width = input_ids.shape[1]
    start = max(int(completion_mask.argmax(dim=1).min()) - 1, 0)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if logits_to_keep and start > 0:
        kwargs["logits_to_keep"] = width - start
    else:
        start = 0
    logits = model(**kwargs).logits[:, :-1]
    targets = input_ids[:, start + 1:]
    mask = mask[:, start:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                          targets.masked_fill(~mask, -100).reshape(-1), reduction="none").view(targets.shape)
    return -nll.sum(dim=-1), mask.sum(dim=-1)


def packed_completion_logps(model, batch: dict, *, fused: bool = False):
    """completion_logps for the packed layouts (preference.collate_pairs_packed / collate_pairs_shared): one
    row, sequences kept apart by varlen attention; the token at `score_from` predicts `score_target`, and
    its log-prob is summed into its sequence (`score_sequence`: chosen 0..n-1, rejected n..2n-1)."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **flash_attn_kwargs(batch)}
    at, targets, rows = batch["score_from"], batch["score_target"], batch["score_sequence"]
    if fused:
        hidden = final_hidden_states(model, inputs)[0, at]
        head = unwrap(model).get_output_embeddings()
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
        token = TokenLogps.apply(hidden, head.weight, head.bias, targets, chunk)
    else:
        logits = model(**inputs, use_cache=False).logits[0, at]
        token = -F.cross_entropy(logits.float(), targets, reduction="none")
    n = 2 * int(batch["pairs"])
    logps = torch.zeros(n, dtype=token.dtype, device=token.device).index_add(0, rows, token)
    return logps, torch.bincount(rows, minlength=n)


def _first_sequence(batch: dict) -> dict:
    """Model inputs for the batch's first sequence alone (padded or packed layout)."""
    if "cu_seq_lens" in batch:
        end = int(batch["cu_seq_lens"][1])
        return {"input_ids": batch["input_ids"][:, :end], "position_ids": batch["position_ids"][:, :end]}
    return {k: batch[k][:1] for k in ("input_ids", "attention_mask")}


def choose_logps_path(model, batch: dict) -> str:
    """"fused" when the model's own logits for a position equal lm_head(last hidden state) (checked on
    one row), else "logits" (with logits_to_keep) or "logits_full"."""
    keep = accepts_logits_to_keep(model)
    if fused_head_usable(model):
        row = _first_sequence(batch)
        with torch.no_grad():
            out, hidden = forward_with_final_hidden(model, row)
            head = unwrap(model).get_output_embeddings()
            own = out.logits[:, -1].float()
            ours = F.linear(hidden[:, -1], head.weight, head.bias).float()
        if torch.allclose(own, ours, rtol=1e-3, atol=1e-3 * max(1.0, float(own.abs().max()))):
            log.info("log-probs: completion positions only, through the LM head in chunks (fused path)")
            return "fused"
        log.warning("this model's logits are not lm_head(hidden state); DPO log-probs use the full logits path")
    return "logits" if keep else "logits_full"
