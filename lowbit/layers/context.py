"""Attention metadata for one forward pass over a flat batch of tokens (set by the model runner)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.layers.transfer import to_device


def padding_index(lens: list[int], device) -> torch.Tensor:
    """Where each token of sequences of `lens` (back to back) sits when each is padded on the right
    to the longest: int64 `[sum(lens)]` into `[len(lens) * max(lens)]`. Built on the host once per
    step, so the attention layers need no device sync to pad and unpad."""
    n = max(lens)
    return to_device([b * n + i for b, m in enumerate(lens) for i in range(m)], torch.long, device)


@dataclass
class AttentionContext:
    """How the flat token batch splits into sequences, and where their keys/values live.

    cu_seqlens_q: int [B+1], token offsets of each sequence's new tokens in the flat batch.
    seq_lens: int [B], tokens of each sequence in the cache after this step (context + new).
    slot_mapping: int [T], cache slot (block * block_size + offset) for each new token.
    block_tables: int [B, max_blocks], -1 padded. All three cache fields are None for a
    cache-less pass (perplexity, calibration), where each sequence attends to its own tokens.
    decode_seqs: the sequences with exactly one new token (host list), which the decode kernel
    serves together; decode_index / decode_rows: the same sequences and their token rows as int64
    device tensors (None when every sequence decodes). fresh_seqs: the sequences of several new
    tokens with nothing cached before them (every sequence of a cache-less pass), which attend
    together in one call; fresh_rows (int64, device) their token rows (None: all rows, in order),
    fresh_lens their token counts, fresh_pad their `padding_index`. max_seq_len bounds
    seq_lens (it sets the decode kernel's split: max_model_len under CUDA graphs).
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    # host copies, so the torch reference can loop over sequences without device syncs
    cu_seqlens_q_list: list[int] | None = None
    seq_lens_list: list[int] | None = None
    decode_seqs: list[int] | None = None
    decode_index: torch.Tensor | None = None
    decode_rows: torch.Tensor | None = None
    fresh_seqs: list[int] | None = None
    fresh_rows: torch.Tensor | None = None
    fresh_lens: list[int] | None = None
    fresh_pad: torch.Tensor | None = None
    max_seq_len: int | None = None

    @classmethod
    def cacheless(cls, seq_lens: list[int], device) -> "AttentionContext":
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        return cls(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            cu_seqlens_q_list=cu,
            seq_lens_list=list(seq_lens),
            fresh_seqs=list(range(len(seq_lens))),
            fresh_lens=list(seq_lens),
            fresh_pad=padding_index(list(seq_lens), device),
        )

    @property
    def uses_cache(self) -> bool:
        return self.slot_mapping is not None

    @property
    def decode_only(self) -> bool:
        return self.decode_seqs is not None and len(self.decode_seqs) == len(self.cu_seqlens_q_list) - 1
