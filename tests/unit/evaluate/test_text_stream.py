"""Streaming text: whole characters only, and the pieces add up to the full decode."""

import pytest
from transformers import AutoTokenizer

from lmpipeline.evaluate.chat import _TextStream, default_max_new_tokens
from lmpipeline.evaluate.text_stream import REPLACEMENT, IncrementalDecoder

TEXT = "héllo 日本 🙂, naïve café\nnext line: ok"


@pytest.fixture(scope="module")
def byte_tokenizer(tiny_model):
    """The embedded model's byte-level tokenizer: é, 日 and 🙂 each take several tokens."""
    return AutoTokenizer.from_pretrained(tiny_model)


def _pieces(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push([i]) for i in ids]
    return pieces + [decoder.finish()]


def test_byte_tokens_never_stream_a_replacement_character(byte_tokenizer):
    ids = byte_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert any(REPLACEMENT in byte_tokenizer.decode([i]) for i in ids)  # the case exists: tokens split characters
    pieces = _pieces(byte_tokenizer, ids)
    assert not any(REPLACEMENT in p for p in pieces)
    assert "".join(pieces) == byte_tokenizer.decode(ids) == TEXT


def test_a_stream_cut_inside_a_character_drops_only_that_character(byte_tokenizer):
    ids = byte_tokenizer("ok 🙂", add_special_tokens=False)["input_ids"]
    assert "".join(_pieces(byte_tokenizer, ids[:-1])) == "ok "


def test_sentencepiece_spaces_survive_piece_by_piece(shared_data):
    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama2")
    ids = tok("Hello world, this is a test. 日本 ok", add_special_tokens=False)["input_ids"]
    assert "".join(_pieces(tok, ids)) == tok.decode(ids)


def test_chat_streamer_writes_whole_characters(byte_tokenizer):
    import io

    out = io.StringIO()
    streamer = _TextStream(byte_tokenizer, out)
    ids = byte_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for i in ids:  # the engine's on_tokens callback: request, sample, the new token ids
        streamer(0, 0, [i])
        assert REPLACEMENT not in out.getvalue()
    streamer.finish()
    assert out.getvalue() == TEXT


def test_default_answer_length_leaves_room_for_history():
    class Model:
        class config:
            max_position_embeddings = 512

    assert default_max_new_tokens(Model) == 128
    Model.config.max_position_embeddings = None
    assert default_max_new_tokens(Model) == 512
