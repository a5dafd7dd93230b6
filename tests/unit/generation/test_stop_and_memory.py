"""Stop strings, eos cuts, the byte counts of memory.py, and the CUDA-graph buckets."""

import pytest

from lmpipeline.generation import memory, stop
from lmpipeline.generation.graphs import bucket_for, buckets


def _decode(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def test_stop_string_is_found_at_the_token_that_completes_it():
    toks = [0, 1, 2, 3, 4, 5]  # "abcdef"
    assert stop.find_stop_string(_decode, toks, ["cd"], 0) == (4, "ab")
    assert stop.find_stop_string(_decode, toks, ["zz"], 0) is None
    assert stop.find_stop_string(_decode, toks, ["ef", "bc"], 0) == (3, "a")


def test_eos_cut_and_visible_text():
    assert stop.eos_cut([4, 9, 2, 9], [9]) == 2 and stop.eos_cut([1, 2], [9]) is None
    assert stop.visible_text(_decode, [0, 1, 9], [9]) == "ab"


def test_kv_cache_bytes_of_llama_3b_at_batch_256():
    # 28 layers, 8 kv heads of 128, bf16: 2 * 28 * 8 * 128 * 2 = 114,688 bytes per token.
    shape = memory.ModelShape(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, head_dim=128,
                              vocab=128256, dtype_bytes=2)
    assert memory.kv_cache_bytes(shape, slots=256, max_len=384) == 114688 * 256 * 384
    need = memory.generation_bytes(shape, slots=256, max_len=384, max_new=256)
    assert need.total == need.kv_cache + need.slot_state + need.sampling + need.prefill
    assert need.sampling == 256 * 128256 * memory.SAMPLING_BYTES_PER_LOGIT


def test_model_shape_from_a_config(tiny_model):
    from transformers import AutoConfig

    shape = memory.ModelShape.of(AutoConfig.from_pretrained(tiny_model), 4)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.vocab) == (4, 2, 32, 1536)


@pytest.mark.parametrize("slots,expected", [(1, [1]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8])])
def test_buckets_cover_every_slot_count(slots, expected):
    assert buckets(slots) == expected
    assert all(bucket_for(n, expected) >= n for n in range(1, slots + 1))


def test_a_request_set_that_does_not_fit_names_the_sizes(monkeypatch):
    import torch

    from lmpipeline.errors import UserError

    shape = memory.ModelShape(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, head_dim=128,
                              vocab=128256, dtype_bytes=2)
    need = memory.generation_bytes(shape, slots=256, max_len=384, max_new=256)
    free = need.total // 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    with pytest.raises(UserError) as e:
        memory.check_fits(need, torch.device("cuda"), slots=256, max_len=384)
    text = str(e.value) + (e.value.hint or "")
    assert "KV cache 10.50 GiB (256 slots x 384 tokens)" in text
    per_slot = (need.kv_cache + need.slot_state + need.sampling) / 256
    assert f"at most {int((free - need.prefill) // per_slot)} slots" in text
    memory.check_fits(need, torch.device("cpu"), slots=256, max_len=384)  # the CPU is not checked
