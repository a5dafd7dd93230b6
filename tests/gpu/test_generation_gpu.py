"""The generation engine on the GPU: bf16, CUDA graphs, the bench model (random Llama-3.2-3B).

Skipped without CUDA (CI); run on the device machine:
    python3 -m pytest -m gpu tests/gpu/test_generation_gpu.py -q -s
(-s shows the printed agreement figures, which go into bench/README.md.)

Agreement with model.generate in bf16 is a share, not an equality: both sides round every layer's
output to bf16 (8 significant bits, relative 2^-9) in a different order (static cache + graphs vs the
dynamic cache), and a random-weight model's logits lie close together, so a near tie may break the
other way and the two continuations part there. Reported: the share of generated tokens before each
prompt's first divergence.

Log-prob tolerance: 28 layers, each output rounded to bf16; independent roundings add up like
sqrt(2 x 28) ~ 7.5 of them, ~1.5% of a hidden value, and the random model's logits are O(1), so the
log-softmax of a token moves by a few hundredths at most. BF16_LOGPROB_TOLERANCE = 0.1 bounds that
with margin; a wrong cache row or position moves log-probs by whole units.
"""

from __future__ import annotations

import pytest
import torch

from lmpipeline.bench import workloads
from lmpipeline.bench.generation import prompt_rows
from lmpipeline.generation import GenerationEngine, Request, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 64, 128, 64
BF16_LOGPROB_TOLERANCE = 0.1  # module docstring
DEVICE = "cuda"  # module-level so the logic can be dry-run on the CPU with a tiny model


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = workloads.make_model("llama-3.2-3b", tmp_path_factory.mktemp("bench-3b"))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE).eval()


def _teacher_forced(model, prompt, completion):
    ids = torch.tensor([prompt + completion], device=DEVICE)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion, device=DEVICE)[:, None])[:, 0]


def _max_logprob_error(model, prompts, results) -> float:
    return max(float((_teacher_forced(model, p, c.token_ids) - torch.tensor(c.logprobs, device=DEVICE)).abs().max())
               for p, (c,) in zip(prompts, results))


def test_bf16_greedy_agrees_with_generate_and_logprobs_with_teacher_forcing(bench_model):
    prompts = prompt_rows("llama-3.2-3b", PROMPTS, PROMPT_TOKENS, seed=1)
    engine = GenerationEngine(bench_model, None, max_slots=PROMPTS)
    ours = engine.generate([Request(p, SamplingParams(max_new_tokens=NEW_TOKENS)) for p in prompts])
    ids = torch.tensor(prompts, device=DEVICE)
    with torch.inference_mode():
        ref = bench_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=bench_model.config.pad_token_id)[:, PROMPT_TOKENS:].tolist()
    agreed = 0
    for (c,), r in zip(ours, ref):
        agreed += next((i for i, (a, b) in enumerate(zip(c.token_ids, r)) if a != b), min(len(c.token_ids), len(r)))
    share = agreed / (PROMPTS * NEW_TOKENS)
    error = _max_logprob_error(bench_model, prompts, ours)
    print(f"\nbf16 greedy: {share:.1%} of tokens before the first divergence from model.generate "
          f"({PROMPTS} prompts x {NEW_TOKENS}); max |log-prob - teacher forced| = {error:.4f}; "
          f"capture {engine.stats.get('capture_seconds', 0):.1f}s")
    assert error < BF16_LOGPROB_TOLERANCE
    assert share > 0.5  # the figure that matters is the printed one; far below it means a bug, not rounding


def test_graph_replay_equals_eager_steps(bench_model):
    prompts = prompt_rows("llama-3.2-3b", 12, 40, seed=2)
    reqs = [Request(p, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=n, seed=3, n=2))
            for p, n in zip(prompts, [8, 24, 40] * 4)]
    graphs = GenerationEngine(bench_model, None, max_slots=8, cuda_graphs=True).generate(reqs)
    eager = GenerationEngine(bench_model, None, max_slots=8, cuda_graphs=False).generate(reqs)
    assert [[c.token_ids for c in s] for s in graphs] == [[c.token_ids for c in s] for s in eager]


def test_lora_adapter_stays_live_under_graphs(bench_model):
    from peft import LoraConfig, get_peft_model

    prompts = prompt_rows("llama-3.2-3b", 8, 32, seed=4)
    reqs = [Request(p, SamplingParams(max_new_tokens=16)) for p in prompts]
    before = GenerationEngine(bench_model, None, max_slots=8).generate(reqs)
    torch.manual_seed(0)
    peft = get_peft_model(bench_model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    try:
        after = GenerationEngine(peft, None, max_slots=8).generate(reqs)
        assert [c.token_ids for (c,) in after] != [c.token_ids for (c,) in before]
        error = _max_logprob_error(peft, prompts, after)
        print(f"\nLoRA under graphs: max |log-prob - teacher forced| = {error:.4f}")
        assert error < BF16_LOGPROB_TOLERANCE
    finally:
        peft.unload()
