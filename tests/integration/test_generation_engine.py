"""The generation engine against transformers on the embedded tiny chat model (CPU, float32).

Reference for tokens: model.generate (greedy, left padded batches). Reference for log-probs: one
teacher-forced forward over prompt + completion, through transformers' own logits warpers for the
sampled runs.

Why 1e-4 holds for log-probs: both sides are float32 (unit roundoff 6e-8) and compute the same
functions; they differ only in summation order (the engine's attention reads a length-masked static
cache one token at a time, the reference runs causal SDPA over the whole sequence; prefill batches
are right padded, the reference is not). Each reordering perturbs a sum of n terms by at most about
n * 6e-8 of its magnitude: over the tiny model's width (128, 352 in the MLP), at most ~300 keys and
4 layers, with logits of magnitude ~10, that is well under 1e-5 per logit; a log-softmax over the
1,536-token vocabulary adds at most the same again. 1e-4 leaves a tenfold margin above that bound
while a real error (a wrong position, a stale cache row, a wrong distribution) moves log-probs by 1e-2
or more.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmpipeline.generation import GenerationEngine, Request, SamplingParams
from lmpipeline.generation.modes import generation_mode, is_generation_ready
from tests.unit.evaluate.tiny import one_thread

pytestmark = pytest.mark.integration

LOGPROB_TOLERANCE = 1e-4  # module docstring
NEW_TOKENS = 24  # the quickstart eval stage's max_new_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompts(tiny, quickstart_data):
    """100 quickstart prompts: the golden set, then the SFT eval conversations without their answers."""
    _, tok = tiny
    messages = [[{"role": "user", "content": json.loads(line)["prompt"]}]
                for line in (quickstart_data / "golden.jsonl").read_text().splitlines()]
    for line in (quickstart_data / "sft_eval.jsonl").read_text().splitlines():
        conv = json.loads(line)["messages"]
        messages.append([m for m in conv if m["role"] != "assistant"])
    ids = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages[:100]]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ids]


def eos(tok) -> tuple[int, ...]:
    return tuple(sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}))


def reference_greedy(model, prompts, stops, pad, max_new=NEW_TOKENS, batch=50):
    """model.generate, greedy, left padded, cut after the first stop token."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=list(stops), pad_token_id=pad)
        for row in gen[:, width:].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
    return out


def teacher_forced(model, prompt, completion, params: SamplingParams | None = None) -> list[float]:
    """log p(completion[i]) from one forward pass over prompt + completion, under `params`' processed
    distribution (transformers' warpers) when sampling, the model's softmax when greedy."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    if params is not None and params.temperature > 0:
        logits = TemperatureLogitsWarper(params.temperature)(ids, logits)
        if params.top_k:
            logits = TopKLogitsWarper(params.top_k)(ids, logits)
        if params.top_p < 1:
            logits = TopPLogitsWarper(params.top_p)(ids, logits)
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1).tolist()


def max_logprob_error(model, prompts, results, params=None) -> float:
    worst = 0.0
    for p, samples in zip(prompts, results):
        for c in samples:
            ref = teacher_forced(model, p, c.token_ids, params)
            worst = max(worst, max(abs(a - b) for a, b in zip(ref, c.logprobs)))
    return worst


def greedy_requests(prompts, tok, max_new=NEW_TOKENS):
    return [Request(p, SamplingParams(max_new_tokens=max_new, eos_ids=eos(tok))) for p in prompts]


def lora_model(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # a large enough B that the adapter changes answers
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft.eval()


def test_greedy_equals_generate_for_100_quickstart_prompts(tiny, prompts):
    model, tok = tiny
    ours = GenerationEngine(model, tok, max_slots=100).generate(greedy_requests(prompts, tok))
    ref = reference_greedy(model, prompts, eos(tok), tok.pad_token_id)
    assert [c[0].token_ids for c in ours] == ref
    assert max_logprob_error(model, prompts[:20], ours[:20]) < LOGPROB_TOLERANCE


def test_greedy_equals_generate_with_an_unmerged_lora_adapter(tiny_model, prompts, tiny):
    from transformers import AutoModelForCausalLM

    _, tok = tiny
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    plain = GenerationEngine(base, tok, max_slots=100).generate(greedy_requests(prompts, tok))
    model = lora_model(base)
    ours = GenerationEngine(model, tok, max_slots=100).generate(greedy_requests(prompts, tok))
    assert sum(a[0].token_ids != b[0].token_ids for a, b in zip(plain, ours)) > 50  # the adapter matters
    assert [c[0].token_ids for c in ours] == reference_greedy(model, prompts, eos(tok), tok.pad_token_id)
    assert max_logprob_error(model, prompts[:20], ours[:20]) < LOGPROB_TOLERANCE


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=20),
                                      dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, top_k=50, top_p=0.9)])
def test_sampled_logprobs_equal_the_processed_distribution(tiny, prompts, settings):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=16, eos_ids=eos(tok), seed=7, **settings)
    results = GenerationEngine(model, tok, max_slots=16).generate([Request(p, params) for p in prompts[:16]])
    assert max_logprob_error(model, prompts[:16], results, params) < LOGPROB_TOLERANCE


def test_greedy_and_sampled_requests_share_a_batch(tiny, prompts):
    model, tok = tiny
    engine = GenerationEngine(model, tok, max_slots=8)
    greedy = engine.generate(greedy_requests(prompts[:8], tok))
    hot = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=NEW_TOKENS, eos_ids=eos(tok), seed=3)
    mixed = engine.generate([Request(p, hot if i % 2 else SamplingParams(max_new_tokens=NEW_TOKENS, eos_ids=eos(tok)))
                             for i, p in enumerate(prompts[:8])])
    assert [c[0].token_ids for c in mixed[::2]] == [c[0].token_ids for c in greedy[::2]]


def test_stop_strings_cut_text_and_tokens(tiny, prompts):
    model, tok = tiny
    engine = GenerationEngine(model, tok, max_slots=4)
    full = engine.generate(greedy_requests(prompts[:4], tok))[0][0]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = " " + words[2]
    cut = engine.generate([Request(prompts[0], SamplingParams(max_new_tokens=NEW_TOKENS, eos_ids=eos(tok),
                                                              stop=(stop,)))])[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    assert stop in tok.decode(cut.token_ids) and stop not in tok.decode(cut.token_ids[:-1])
    # Batched with other prompts the matmuls round differently: equal within float32 noise.
    assert cut.logprobs == pytest.approx(full.logprobs[:len(cut.token_ids)], abs=LOGPROB_TOLERANCE)


def test_eos_ids_and_per_request_max_new_tokens(tiny, prompts):
    model, tok = tiny
    engine = GenerationEngine(model, tok, max_slots=4)
    full = engine.generate([Request(p, SamplingParams(max_new_tokens=NEW_TOKENS)) for p in prompts[:3]])
    target = full[0][0].token_ids[3]
    first = full[0][0].token_ids.index(target)
    lengths = [1, 5, 9]
    out = engine.generate([Request(prompts[0], SamplingParams(max_new_tokens=NEW_TOKENS, eos_ids=(target,)))]
                          + [Request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[1:3], lengths[1:])]
                          + [Request(prompts[1], SamplingParams(max_new_tokens=lengths[0]))])
    assert out[0][0].token_ids == full[0][0].token_ids[:first + 1] and out[0][0].finish_reason == "stop"
    for (c,), ref, n in zip(out[1:3], full[1:3], lengths[1:]):
        assert c.token_ids == ref[0].token_ids[:n] and c.finish_reason == "length"
    assert out[3][0].token_ids == full[1][0].token_ids[:1]


def test_n_samples_share_one_prefill_and_refill_slots(tiny, prompts, monkeypatch):
    model, tok = tiny
    params = SamplingParams(temperature=1.0, max_new_tokens=12, eos_ids=eos(tok), n=4, seed=11)
    wide = GenerationEngine(model, tok, max_slots=32)
    rows = []
    monkeypatch.setattr(wide.runner, "prefill", _counting(wide.runner.prefill, rows))
    reqs = [Request(p, params) for p in prompts[:6]]
    a = wide.generate(reqs)
    assert sum(rows) == 6  # each prompt prefilled once for its 4 samples
    assert all(len(s) == 4 for s in a) and len({tuple(c.token_ids) for c in a[0]}) > 1
    # Fewer slots than samples in flight: finished slots are refilled from the queue, same samples.
    narrow = GenerationEngine(model, tok, max_slots=5, sync_every=3).generate(reqs)
    assert [[c.token_ids for c in s] for s in narrow] == [[c.token_ids for c in s] for s in a]
    assert max_logprob_error(model, prompts[:6], a, params) < LOGPROB_TOLERANCE


def _counting(fn, rows):
    def wrapped(cache, ids, lengths, slots):
        rows.append(ids.shape[0])
        return fn(cache, ids, lengths, slots)
    return wrapped


def test_more_requests_than_slots_gives_the_same_greedy_answers(tiny, prompts):
    model, tok = tiny
    reqs = [Request(p, SamplingParams(max_new_tokens=n, eos_ids=eos(tok))) for p, n in zip(prompts[:12], [4, 24] * 6)]
    many = GenerationEngine(model, tok, max_slots=12).generate(reqs)
    few = GenerationEngine(model, tok, max_slots=3, sync_every=2).generate(reqs)
    assert [c[0].token_ids for c in few] == [c[0].token_ids for c in many]


def test_same_seed_same_samples_other_seed_other_samples(tiny, prompts):
    model, tok = tiny
    engine = GenerationEngine(model, tok, max_slots=8)

    def run(seed, slots=8):
        params = SamplingParams(temperature=1.0, top_k=40, max_new_tokens=16, seed=seed)
        return [c[0].token_ids for c in GenerationEngine(model, tok, max_slots=slots).generate(
            [Request(p, params) for p in prompts[:8]])]

    assert run(5) == run(5) == run(5, slots=3)
    assert run(5) != run(6)
    assert engine.generate([Request(prompts[0], SamplingParams(temperature=1.0, max_new_tokens=8, seed=5))]) == \
        engine.generate([Request(prompts[0], SamplingParams(temperature=1.0, max_new_tokens=8, seed=5))])


def test_streaming_passes_every_token_once(tiny, prompts):
    model, tok = tiny
    seen: dict = {}
    out = GenerationEngine(model, tok, max_slots=2, sync_every=1).generate(
        greedy_requests(prompts[:3], tok), on_tokens=lambda r, k, ids: seen.setdefault((r, k), []).extend(ids))
    assert [seen[(i, 0)] for i in range(3)] == [c[0].token_ids for c in out]


def test_fallback_path_has_the_same_interface_and_answers(tiny, prompts, caplog):
    model, tok = tiny
    native = GenerationEngine(model, tok, max_slots=8).generate(greedy_requests(prompts[:8], tok))
    engine = GenerationEngine(model, tok, max_slots=8)
    engine.reason = "forced for the test"
    fallback = engine.generate(greedy_requests(prompts[:8], tok))
    assert [c[0].token_ids for c in fallback] == [c[0].token_ids for c in native]
    assert [c[0].finish_reason for c in fallback] == [c[0].finish_reason for c in native]
    assert max(abs(a - b) for x, y in zip(native, fallback) for a, b in zip(x[0].logprobs, y[0].logprobs)) \
        < LOGPROB_TOLERANCE


def test_generation_mode_switches_training_speedups_off_and_restores_them(tiny_model, tiny, prompts):
    from transformers import AutoModelForCausalLM

    from lmpipeline.models import attention

    _, tok = tiny
    model = lora_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    attention.switch(model, attention.VARLEN)
    casts = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for m in casts:
        m.cast_input_dtype_enabled = False
    from lmpipeline.models.compile import decoder_layers

    decoder_layers(model)[0].compile()  # lazy: nothing is compiled unless the layer is called
    before = _snapshot(model)
    with generation_mode(model):
        assert is_generation_ready(model)
        GenerationEngine(model, tok, max_slots=2).generate(greedy_requests(prompts[:2], tok, max_new=4))
    after = _snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(after.pop("weights"), before.pop("weights")))
    assert after == before
    assert not is_generation_ready(model)


def _snapshot(model) -> dict:
    from lmpipeline.models import attention
    from lmpipeline.models.compile import decoder_layers

    _, config = attention._text_config(model)
    return {"training": [m.training for m in model.modules()],
            "checkpointing": [getattr(m, "gradient_checkpointing", None) for m in model.modules()],
            "casts": [getattr(m, "cast_input_dtype_enabled", None) for m in model.modules()],
            "compiled": [layer._compiled_call_impl for layer in decoder_layers(model)],
            "attention": config._attn_implementation, "use_cache": config.use_cache,
            "weights": [p.detach().clone() for p in model.parameters()],
            "grad": [p.requires_grad for p in model.parameters()]}


def test_generate_command_samples_reproducibly_and_stops_at_a_string(tiny_model, quickstart_data, tmp_path):
    from lmpipeline.commands.generate import generate_command

    def run(name, **kw):
        out = tmp_path / f"{name}.jsonl"
        assert generate_command(str(tiny_model), str(quickstart_data / "golden.jsonl"), str(out), max_new_tokens=12,
                                max_samples=6, dtype="float32", **kw) == 0
        return [json.loads(line) for line in out.read_text().splitlines()]

    hot = dict(temperature=1.0, top_k=30, top_p=0.95)
    a, b, c = run("a", seed=1, **hot), run("b", seed=1, **hot), run("c", seed=2, **hot)
    assert [r["output"] for r in a] == [r["output"] for r in b] != [r["output"] for r in c]
    greedy = run("greedy")
    word = next(w for r in greedy for w in r["output"].split()[1:2])
    cut = run("cut", stop=[" " + word])
    assert all(" " + word not in r["output"] for r in cut)
    assert any(r["finished"] and len(r["output"]) < len(g["output"]) for r, g in zip(cut, greedy))
