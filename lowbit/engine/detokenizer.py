"""Incremental detokenization: the text of a growing list of token ids, decoding a short window per
new token (vLLM's prefix and read offsets) instead of every id on every step.

`decode(ids[prefix:read])` is text already emitted and `decode(ids[prefix:])` minus it is the new
text. Decoding from `prefix` rather than `read` gives the tokenizer the context it needs to place a
leading space (SentencePiece drops it on the first token of a decode). The offsets move only once
the new text is non-empty and does not end in U+FFFD (an incomplete UTF-8 character); until then
the new text is shown as a full decode shows it, so `text == tokenizer.decode(ids)` after every token.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        # transformers' decode is its Rust backend's plus argument conversion (a few us a call, two
        # calls per token per step) and an optional clean-up pass: without that pass, call the backend
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None if getattr(tokenizer, "clean_up_tokenization_spaces", True) else backend
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.stable = ""  # the text of ids[:read_offset]: final
        self.pending = ""  # the text of ids[read_offset:], which later tokens may still change

    @property
    def text(self) -> str:
        return self.stable + self.pending

    def append(self, token: int) -> str:
        """Add one token; return the whole text so far."""
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new = self._decode(self.ids[self.prefix_offset:])[len(prefix_text):]
        if new and not new.endswith("\ufffd"):
            self.stable, self.pending = self.stable + new, ""
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        else:
            self.pending = new
        return self.text

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        decode = self.tokenizer.decode if self._backend is None else self._backend.decode
        return decode(ids, skip_special_tokens=self.skip_special_tokens)
