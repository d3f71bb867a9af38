"""Incremental detokenization equals a full decode after every token."""
from __future__ import annotations

import random

import pytest

from lowbit.engine.detokenizer import IncrementalDetokenizer

TEXT = "Grüße aus Köln: 日本語のテキスト, emoji 🤗🚀 and  double  spaces.\nNew line, ünïcödé ✓ done."


def _check(tokenizer, ids: list[int], skip: bool) -> None:
    detok = IncrementalDetokenizer(tokenizer, skip)
    assert detok._backend is not None  # the default tokenizer has no clean-up pass: the fast path is tested
    for i, t in enumerate(ids):
        assert detok.append(t) == tokenizer.decode(ids[:i + 1], skip_special_tokens=skip), (i, ids[:i + 1])


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_full_decode(default_tokenizer, skip):
    rng = random.Random(0)
    vocab = len(default_tokenizer)
    special = default_tokenizer.all_special_ids
    for _ in range(20):
        ids = [rng.choice(special) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        _check(default_tokenizer, ids, skip)


def test_multibyte_text_matches_full_decode(default_tokenizer):
    ids = default_tokenizer.encode(TEXT, add_special_tokens=False)
    _check(default_tokenizer, ids, True)
    detok = IncrementalDetokenizer(default_tokenizer)
    for t in ids:
        detok.append(t)
    assert detok.text == TEXT


def test_byte_tokens_of_one_character(default_tokenizer):
    """A character split over byte tokens shows U+FFFD until it is complete, as a full decode does."""
    ids = default_tokenizer.encode("🤗", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(default_tokenizer)
    texts = [detok.append(t) for t in ids]
    assert texts[-1] == "🤗" and all("\ufffd" in t for t in texts[:-1])
    assert detok.stable == "🤗" and detok.pending == ""


def test_sentencepiece_leading_spaces():
    """A Metaspace decoder drops the leading space of a decode's first token: the prefix window keeps it."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "\u2581Hello", "\u2581world", "!", "\u2581a", "b", "<0xC3>", "<0xA9>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = [1, 2, 3, 4, 5, 2, 6, 7, 4, 2]
    assert tokenizer.decode(ids) == "Hello world! ab world\u00e9 a world"
    _check(tokenizer, ids, True)
