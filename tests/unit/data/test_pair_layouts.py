"""data/preference.py's packed pair layouts, token by token: which position scores which token, and
which keys each query segment reads (the model-level equality is tests/integration/test_dpo.py's)."""

import pytest

from lmpipeline.data.preference import collate_pairs_packed, collate_pairs_shared, layout_tokens
from lmpipeline.data.types import TokenizedPair

PAIR = TokenizedPair([11, 12], [21, 22, 23], [31, 32])


def test_shared_layout_reads_the_prompt_once():
    b = collate_pairs_shared([PAIR])
    assert b["input_ids"].tolist() == [[11, 12, 21, 22, 23, 31, 32]]
    # rejected continues from the prompt's end, as if it followed the prompt alone
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert b["cu_seq_lens"].tolist() == [0, 5, 7] and b["max_length"] == 5
    # keys: prompt+chosen, then prompt+rejected (never chosen)
    assert b["cu_seq_lens_k"].tolist() == [0, 5, 9] and b["max_length_k"] == 5
    assert b["kv_gather"].tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6]
    # both replies' first tokens are scored from the prompt's last position
    assert b["score_from"].tolist() == [1, 2, 3, 1, 5]
    assert b["score_target"].tolist() == [21, 22, 23, 31, 32]
    assert b["score_sequence"].tolist() == [0, 0, 0, 1, 1]
    assert layout_tokens(PAIR, "shared") == 7 and layout_tokens(PAIR, "packed") == 9
    assert layout_tokens(PAIR, "padded") == 2 * 5


def test_packed_layout_scores_the_same_tokens():
    b = collate_pairs_packed([PAIR])
    assert b["input_ids"].tolist() == [[11, 12, 21, 22, 23, 11, 12, 31, 32]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert b["cu_seq_lens"].tolist() == [0, 5, 9] and "kv_gather" not in b
    assert b["score_from"].tolist() == [1, 2, 3, 6, 7]
    assert b["score_target"].tolist() == [21, 22, 23, 31, 32]
    assert b["score_sequence"].tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("collate", [collate_pairs_shared, collate_pairs_packed])
def test_pairs_are_indexed_chosen_first_and_an_empty_prompt_scores_no_first_token(collate):
    """Two pairs: sequences 0, 1 are the chosen replies, 2, 3 the rejected. Without a prompt nothing
    predicts a reply's first token, so it is not scored (as in the padded layout)."""
    b = collate([PAIR, TokenizedPair([], [41, 42], [51, 52, 53])])
    targets = dict.fromkeys(range(4), None)
    for seq, tok in zip(b["score_sequence"].tolist(), b["score_target"].tolist()):
        targets[seq] = (targets[seq] or []) + [tok]
    assert targets == {0: [21, 22, 23], 1: [42], 2: [31, 32], 3: [52, 53]}
    ids = b["input_ids"][0].tolist()
    for at, tok, seq in zip(b["score_from"].tolist(), b["score_target"].tolist(), b["score_sequence"].tolist()):
        # each position predicts the token after it, except a shared prompt's end predicting the rejected reply
        assert ids[at + 1] == tok or (collate is collate_pairs_shared and seq >= 2 and tok == 31)
