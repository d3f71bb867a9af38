"""Attention metadata for one forward pass over a flat batch of tokens (set by the model runner)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch

from lowbit.layers.transfer import to_device


def padding_index(lens: list[int], device) -> torch.Tensor:
    """Where each token of sequences of `lens` (back to back) sits when each is padded on the right
    to the longest: int64 `[sum(lens)]` into `[len(lens) * max(lens)]`. Built on the host once per
    step, so the attention layers need no device sync to pad and unpad."""
    n = max(lens)
    return to_device([b * n + i for b, m in enumerate(lens) for i in range(m)], torch.long, device)


MAX_VIEW_RUNS = 2  # runs of equal-length prompts worth one SDPA call each rather than one varlen call


def equal_length_runs(lens: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive sequences of one length: (first row, sequences, length) for each run."""
    runs, row = [], 0
    for n in lens:
        if runs and runs[-1][2] == n:
            runs[-1][1] += 1
        else:
            runs.append([row, 1, n])
        row += n
    return [tuple(r) for r in runs]


class ShapeHistory:
    """In how many steps each (sequences, length) shape of a run of fresh prompts has come.

    cuDNN, SDPA's first choice on Hopper, builds an execution plan the first time it meets a shape
    (tens of ms or more); its kernel is then faster than flash attention (337 against about 590 us for
    16 prompts of 1024 on the H200). That pays for a shape that keeps coming (a batch of equal prompts)
    and not for one that comes once (a chunk's length, new each step; the likely cause of the fp8
    1024/512 run losing 3-4% when every run went to cuDNN, docs/benchmarks.md). A shape is `planned`
    once it has come in `recur` earlier steps. At most `most` shapes are kept (then it starts over)."""

    def __init__(self, recur: int = 4, most: int = 4096):
        self.recur, self.most, self.steps = recur, most, {}

    def planned(self, shape: tuple[int, int]) -> bool:
        """Count one more step with `shape`; whether it had come in `recur` steps before this one."""
        if shape not in self.steps and len(self.steps) >= self.most:
            self.steps.clear()
        seen = self.steps.get(shape, 0)
        self.steps[shape] = seen + 1
        return seen >= self.recur


FRESH_SHAPES = ShapeHistory()


def row_index(spans: list[tuple[int, int]], device) -> slice | torch.Tensor:
    """The rows of half-open `spans` (in order) as an index: a slice when they are one run (a view,
    no gather or scatter), else int64 `[n]` on `device`."""
    runs = []
    for s, e in spans:
        if runs and runs[-1][1] == s:
            runs[-1][1] = e
        elif e > s:
            runs.append([s, e])
    if len(runs) <= 1:
        return slice(*runs[0]) if runs else slice(0, 0)
    return to_device([r for s, e in runs for r in range(s, e)], torch.long, device)


@dataclass
class AttentionContext:
    """How the flat token batch splits into sequences, and where their keys/values live.

    cu_seqlens_q: int [B+1], token offsets of each sequence's new tokens in the flat batch.
    seq_lens: int [B], tokens of each sequence in the cache after this step (context + new).
    slot_mapping: int [T], cache slot (block * block_size + offset) for each new token.
    block_tables: int [B, max_blocks], -1 padded. All three cache fields are None for a
    cache-less pass (perplexity, calibration), where each sequence attends to its own tokens.
    decode_seqs: the sequences with exactly one new token (host list), which the decode kernel
    serves together; decode_index / decode_rows: the same sequences and their token rows (`row_index`:
    a slice, or int64 on the device; None when every sequence decodes). fresh_seqs: the sequences of
    several new tokens with nothing cached before them (every sequence of a cache-less pass), which
    attend together in one call; fresh_rows their token rows (`row_index`; None: all rows, in order),
    fresh_lens their token counts. max_seq_len bounds seq_lens (it sets the decode kernel's split:
    max_model_len under CUDA graphs).
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    # host copies, so the torch reference can loop over sequences without device syncs
    cu_seqlens_q_list: list[int] | None = None
    seq_lens_list: list[int] | None = None
    decode_seqs: list[int] | None = None
    decode_index: slice | torch.Tensor | None = None
    decode_rows: slice | torch.Tensor | None = None
    fresh_seqs: list[int] | None = None
    fresh_rows: slice | torch.Tensor | None = None
    fresh_lens: list[int] | None = None
    max_seq_len: int | None = None

    # built on the host once per step, on first use, so no layer needs a device sync for them
    @cached_property
    def fresh_pad(self) -> torch.Tensor:
        """`padding_index(fresh_lens)`, for attention over the fresh sequences padded to the longest."""
        return padding_index(self.fresh_lens, self.cu_seqlens_q.device)

    @cached_property
    def fresh_runs(self) -> list[tuple[int, int, int, bool]] | None:
        """The fresh sequences as runs of one length (`equal_length_runs`), each with whether SDPA may
        plan a kernel for its shape (on CUDA: `FRESH_SHAPES`, counted once a step); None above
        MAX_VIEW_RUNS runs."""
        runs = equal_length_runs(self.fresh_lens)
        if len(runs) > MAX_VIEW_RUNS:
            return None
        cuda = self.cu_seqlens_q.device.type == "cuda"
        return [(s, b, n, not cuda or FRESH_SHAPES.planned((b, n))) for s, b, n in runs]

    @cached_property
    def chunk_seqs(self) -> list[int]:
        """The sequences of several new tokens over a cached context (neither decodes nor fresh)."""
        done = set(self.decode_seqs or ()) | set(self.fresh_seqs or ())
        return [i for i in range(len(self.cu_seqlens_q_list) - 1) if i not in done]

    @cached_property
    def chunk_index(self) -> torch.Tensor:
        """`chunk_seqs` as int32 on the device."""
        return to_device(self.chunk_seqs, torch.int32, self.cu_seqlens_q.device)

    @cached_property
    def chunk_rows(self) -> slice | torch.Tensor:
        """The chunks' token rows (`row_index`)."""
        cu = self.cu_seqlens_q_list
        return row_index([(cu[i], cu[i + 1]) for i in self.chunk_seqs], self.cu_seqlens_q.device)

    @cached_property
    def chunk_cu_q(self) -> torch.Tensor:
        """int32 `[len(chunk_seqs) + 1]`: the chunks' offsets within their rows."""
        cu = self.cu_seqlens_q_list
        return to_device(list(accumulate((cu[i + 1] - cu[i] for i in self.chunk_seqs), initial=0)), torch.int32,
                         self.cu_seqlens_q.device)

    @cached_property
    def chunk_k_lens(self) -> list[int]:
        """Each chunk's sequence length in the cache after this step (context and new tokens)."""
        return [self.seq_lens_list[i] for i in self.chunk_seqs]

    @cached_property
    def chunk_cu_k(self) -> torch.Tensor:
        """int32 `[len(chunk_seqs) + 1]`: offsets of the chunks' gathered K/V rows (`chunk_k_lens`)."""
        return to_device(list(accumulate(self.chunk_k_lens, initial=0)), torch.int32, self.cu_seqlens_q.device)

    @cached_property
    def fresh_cu(self) -> torch.Tensor:
        """int32 `[len(fresh_seqs) + 1]`: the fresh sequences' offsets within their rows
        (`cu_seqlens_q` itself when every sequence is fresh)."""
        if len(self.fresh_seqs) == len(self.cu_seqlens_q_list) - 1:
            return self.cu_seqlens_q
        return to_device(list(accumulate(self.fresh_lens, initial=0)), torch.int32, self.cu_seqlens_q.device)

    @classmethod
    def cacheless(cls, seq_lens: list[int], device) -> "AttentionContext":
        cu = list(accumulate(seq_lens, initial=0))
        return cls(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            cu_seqlens_q_list=cu,
            seq_lens_list=list(seq_lens),
            fresh_seqs=list(range(len(seq_lens))),
            fresh_lens=list(seq_lens),
        )

    @property
    def uses_cache(self) -> bool:
        return self.slot_mapping is not None

    @property
    def decode_only(self) -> bool:
        return self.decode_seqs is not None and len(self.decode_seqs) == len(self.cu_seqlens_q_list) - 1
