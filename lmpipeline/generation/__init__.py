"""The batched sampling engine of eval, generate, chat and online RL.

    params.py     Request, SamplingParams, Completion: the interface
    engine.py     GenerationEngine: the queue, the slots, prefill and decode, read-back and refill
    forward.py    prefill / decode over the HF model's own modules (LoRA stays live), SDPA on a static cache
    kv_cache.py   the static [layers, slots, max_len, kv_heads, head_dim] cache
    slots.py      per-slot device state and the decode step
    sampling.py   greedy / temperature / top-k / top-p with log-probs, counter-based randomness
    stop.py       eos ids and stop strings
    graphs.py     the decode step as CUDA graphs, per slot-count bucket
    modes.py      generation_mode: training speed-ups off, then restored
    fallback.py   the same interface over model.generate, for other architectures
    memory.py     the bytes a request set needs (the estimator's and the engine's check)
"""

from lmpipeline.generation.engine import GenerationEngine
from lmpipeline.generation.params import LENGTH, STOP, Completion, Request, SamplingParams

__all__ = ["GenerationEngine", "Request", "SamplingParams", "Completion", "STOP", "LENGTH"]
