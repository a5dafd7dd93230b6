"""The engine's interface over transformers' model.generate, for models forward.py does not serve.

Slower (a host-paced dynamic cache), but the same contract: requests with the same settings are
batched (left padded), n samples through num_return_sequences, log-probs from the processed scores
(output_scores: the distribution each token was drawn from), stop strings cut afterwards, tokens
passed to `on_tokens` once a batch is done. `seed` seeds torch before each batch, so a rerun of the
same request set repeats its samples (unlike the engine, the draws depend on the batch).
"""

from __future__ import annotations

import torch

from lmpipeline.generation.params import LENGTH, STOP, Completion
from lmpipeline.generation.stop import eos_cut, find_stop_string, visible_text

BATCH = 16


def generate_with_hf(model, decode, requests, *, seed: int = 0, on_tokens=None) -> list[list[Completion]]:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    results: list[list[Completion]] = [[] for _ in requests]
    groups: dict = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.params, []).append(i)
    for params, members in groups.items():
        pad = params.eos_ids[0] if params.eos_ids else 0
        cfg = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=params.temperature > 0,
                               num_return_sequences=params.n, pad_token_id=pad,
                               eos_token_id=list(params.eos_ids) or None, output_scores=True,
                               return_dict_in_generate=True,
                               **(dict(temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p)
                                  if params.temperature > 0 else {}))
        for start in range(0, len(members), BATCH):
            idx = members[start:start + BATCH]
            width = max(len(requests[i].prompt_ids) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                p = requests[i].prompt_ids
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            torch.manual_seed(params.seed if params.seed is not None else seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
            new = out.sequences[:, width:]
            logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1)
            picked = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for row in range(new.shape[0]):
                i, k = idx[row // params.n], row % params.n
                toks = new[row].tolist()
                keep = eos_cut(toks, params.eos_ids) or len(toks)
                reason = STOP if keep < len(toks) or (toks and toks[keep - 1] in params.eos_ids) else LENGTH
                toks = toks[:keep]
                text = visible_text(decode, toks, params.eos_ids)
                hit = find_stop_string(decode, toks, params.stop, 0) if params.stop else None
                if hit is not None:
                    keep, text = hit
                    toks, reason = toks[:keep], STOP
                if on_tokens is not None:
                    on_tokens(i, k, toks)
                results[i].append(Completion(toks, text, picked[row, :keep].tolist(), reason))
    return results
