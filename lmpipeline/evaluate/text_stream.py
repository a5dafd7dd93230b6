"""Text of a token stream, piece by piece, without broken characters.

A byte-level tokenizer may split one character (é, 日, an emoji) over several tokens; decoding a token
alone then gives U+FFFD, the replacement character. `IncrementalDecoder` decodes the tokens seen so far
and hands out only the text that no later token can change: a tail ending in U+FFFD may be the start of
a character whose remaining bytes are still to come, so it is held back until they arrive. Each piece
is decoded together with the token before it, so tokenizers that drop a leading space when a token is
decoded alone (SentencePiece) still give the spaces right. `finish()` returns the rest at the end of the
stream, less an incomplete character left by a stop or a length limit.

The concatenation of the pieces equals `tokenizer.decode(all ids)` whenever the stream ends on a whole
character (tests/unit/evaluate/test_text_stream.py).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """push(ids) -> the newly final text; finish() -> what is left. One instance per generated answer."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # tokens before this one are already out and no longer decoded
        self.read_offset = 0  # tokens before this one have had their text handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: list[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT):
            return ""  # nothing new, or a character still missing its last bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def finish(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):].rstrip(REPLACEMENT)
