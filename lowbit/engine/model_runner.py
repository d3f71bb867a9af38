"""Turns a scheduled batch into one forward pass: flat tokens, positions, attention metadata, sampling.

Decode-only batches on CUDA replay a CUDA graph: `StaticDecode` pads the batch to a bucket size
in static input buffers and captures the forward (embedding to last hidden state) once per bucket;
the logits of the real rows are computed after the replay (one GEMM), so no bucket keeps a
`[bucket, vocab]` output alive (at 128 buckets of a 128k vocabulary those would take 34 GB).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import numpy as np
import torch

from lowbit.config import EngineConfig, ModelConfig
from lowbit.engine.kv_cache import QuantizedPagedKVCache, kv_cache_class, make_kv_cache
from lowbit.engine.scheduler import ScheduledSeq
from lowbit.engine.sequence import PENDING, Sequence
from lowbit.errors import LowbitError
from lowbit.kernels.common import cdiv
from lowbit.layers.context import AttentionContext, row_index
from lowbit.layers.sampler import SAMPLE_ROWS, Sampled, TokenLogprob, sample
from lowbit.layers.transfer import copy_to, to_device

log = logging.getLogger(__name__)

CPU_KV_CACHE_TOKENS = 16384  # default cache size on the CPU, where free memory is not measured
MAX_GRAPH_BATCH = 4096  # the largest decode batch captured as a CUDA graph
ACTIVATION_MARGIN = 2**29  # beyond the profiled step: allocator fragmentation, the CUDA graphs' pool


@torch.inference_mode()
def profile_step_memory(model, cfg: EngineConfig) -> int:
    """Bytes the largest step needs beyond the weights (vLLM's profile run): a cache-less forward of
    `max_num_batched_tokens` tokens in sequences of at most `max_model_len`, then the logits and the
    sampler's working set (a sort and softmax of fp32 logits) for the rows it draws at once."""
    device = torch.device(cfg.device)
    tokens = cfg.max_num_batched_tokens
    lens = [min(cfg.max_model_len, tokens - s) for s in range(0, tokens, cfg.max_model_len)]
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    hidden = model(ids, positions, AttentionContext.cacheless(lens, device))
    logits = model.compute_logits(hidden[:min(tokens, cfg.max_num_seqs, SAMPLE_ROWS)]).float()
    del hidden
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1) / torch.empty_like(logits).exponential_()
    del logits, sorted_logits, order, probs
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    return peak


def num_kv_blocks(cfg: EngineConfig, model_cfg: ModelConfig, model: torch.nn.Module, reserve: int = 0) -> int:
    """Blocks that fit: the configured number, or (CUDA) what `gpu_memory_utilization` leaves free
    after the largest step's activations and `reserve` bytes (the CUDA graphs)."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    heads, dim = model_cfg.num_kv_heads, model_cfg.head_dim
    per_block = cfg.block_size * sum(
        kv_cache_class(a.kv_spec, dim, cfg.block_size).bytes_per_token(heads, dim, getattr(torch, cfg.dtype), a.kv_spec)
        for a in model.attention_layers()
    )
    if cfg.device.startswith("cuda"):
        peak = profile_step_memory(model, cfg)
        free, total = torch.cuda.mem_get_info()
        budget = free - (1 - cfg.gpu_memory_utilization) * total - peak - reserve - ACTIVATION_MARGIN
        return max(0, int(budget // per_block))
    return max(CPU_KV_CACHE_TOKENS, 2 * cfg.max_model_len) // cfg.block_size


@dataclass
class HostBatch:
    """A scheduled batch as host lists: flat token ids and positions, cache slots, and per sequence
    the offsets of its new tokens (cu), tokens in the cache after this step, and block table."""
    ids: list[int]
    positions: list[int]
    slots: list[int]
    cu: list[int]
    seq_lens: list[int]
    tables: list[list[int]]

    @property
    def decode_seqs(self) -> list[int]:
        return [i for i in range(len(self.seq_lens)) if self.cu[i + 1] - self.cu[i] == 1]

    @property
    def fresh_seqs(self) -> list[int]:
        """Sequences of several new tokens and nothing cached before them."""
        return [i for i in range(len(self.seq_lens)) if 1 < self.cu[i + 1] - self.cu[i] == self.seq_lens[i]]


def host_batch(batch: list[ScheduledSeq], block_size: int) -> HostBatch:
    hb = HostBatch([], [], [], [0], [], [])
    for item in batch:
        seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_tokens
        hb.ids.extend(seq.token_ids[start:start + n])
        hb.positions.extend(range(start, start + n))
        hb.slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        hb.cu.append(hb.cu[-1] + n)
        hb.seq_lens.append(start + n)
        hb.tables.append(seq.block_table)
    return hb


def padded_tables(tables: list[list[int]], width: int, rows: int, fill: int) -> np.ndarray:
    """int32 `[rows, width]`: the block tables left-aligned, `fill` elsewhere (numpy: 3x faster than
    torch.tensor over nested lists, which costs milliseconds per step at 512 sequences)."""
    out = np.full((rows, width), fill, dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = t
    return out


def prepare_inputs(hb: HostBatch, device: torch.device):
    """-> (input_ids, positions, AttentionContext) on `device` for the eager forward."""
    width = max(len(t) for t in hb.tables)
    decodes = hb.decode_seqs
    mixed = 0 < len(decodes) < len(hb.seq_lens)  # decodes gathered by index (decode-only: as they are)

    def tensor(vals, dtype):
        return to_device(vals, dtype, device)

    fresh = hb.fresh_seqs
    fresh_lens = [hb.cu[i + 1] - hb.cu[i] for i in fresh]

    ctx = AttentionContext(
        cu_seqlens_q=tensor(hb.cu, torch.int32),
        seq_lens=tensor(hb.seq_lens, torch.int32),
        slot_mapping=tensor(hb.slots, torch.long),
        block_tables=to_device(padded_tables(hb.tables, width, len(hb.tables), -1), torch.int32, device),
        cu_seqlens_q_list=hb.cu,
        seq_lens_list=hb.seq_lens,
        decode_seqs=decodes,
        decode_index=row_index([(i, i + 1) for i in decodes], device) if mixed else None,
        decode_rows=row_index([(hb.cu[i], hb.cu[i] + 1) for i in decodes], device) if mixed else None,
        fresh_seqs=fresh,
        fresh_rows=row_index([(hb.cu[i], hb.cu[i + 1]) for i in fresh], device) if fresh else None,
        fresh_lens=fresh_lens,
        max_seq_len=max(hb.seq_lens),
    )
    return tensor(hb.ids, torch.long), tensor(hb.positions, torch.long), ctx


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Padded decode batch sizes: 1, 2, 4, then multiples of 8 to 256, of 16 to 512 (vLLM's), of 64
    beyond (padding at most an eighth of a batch), the last >= max_num_seqs; none above MAX_GRAPH_BATCH (larger
    decode batches run eagerly). Graphs pay off at large batches too: an eager decode step of an 8B
    model at batch 2048 spends about 20 ms launching kernels, a third of its GPU time."""
    n = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, 512, 16), *range(512, max(n, 512) + 64, 64)]
    return [s for s in sizes if s < n] + [next(s for s in sizes if s >= n)]


class StaticDecode:
    """Decode-only batches (one new token per sequence) padded to a bucket size in static input
    buffers, the form a CUDA graph replays. Padding rows write nothing (slot -1) and attend to one
    token of block 0. With `capture` (CUDA) the runner captures every bucket's forward at start-up
    (`capture_all`), into graphs sharing one memory pool; without it (CPU, tests) the same buffers
    run eagerly."""

    def __init__(self, model, cfg: EngineConfig, device: torch.device, capture: bool):
        self.model = model
        self.buckets = decode_buckets(cfg.max_num_seqs)
        self.max_seq_len = cfg.max_model_len  # fixes the decode kernel's split for every replay
        n, width = self.buckets[-1], cdiv(cfg.max_model_len, cfg.block_size)
        self.input_ids, self.positions, self.slot_mapping = (torch.zeros(n, dtype=torch.long, device=device)
                                                             for _ in range(3))
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (so the smaller graphs reuse its pool), as vLLM
        does at start-up: a bucket first met mid-run would cost a run its eager forward and capture."""
        for size in reversed(self.buckets):
            self._fill(HostBatch([0] * size, [0] * size, [-1] * size, list(range(size + 1)), [1] * size,
                                 [[0]] * size), size)
            self._forward(size)  # compiles the kernels for this shape outside the capture
            self._capture(size)

    def hidden(self, hb: HostBatch, patch=None) -> torch.Tensor:
        """Last hidden states `[B, hidden]` of the batch's B sequences (a view into the static output).
        `patch` (see `ModelRunner._patch`) sets input ids that are still on the device."""
        b = len(hb.ids)
        size = next(s for s in self.buckets if s >= b)
        self._fill(hb, size)
        if patch is not None:
            patch(self.input_ids)
        if size in self.graphs:
            graph, hidden = self.graphs[size]
            graph.replay()
            return hidden[:b]
        return self._forward(size)[:b]

    def _fill(self, hb: HostBatch, size: int) -> None:
        """Copy the batch into the buffers' first `size` rows; block-table columns past the longest
        table keep stale entries, which the kernel never reads (they lie past every seq_len)."""
        pad = size - len(hb.ids)
        w = max(len(t) for t in hb.tables)
        for buf, vals in ((self.input_ids, hb.ids + [0] * pad), (self.positions, hb.positions + [0] * pad),
                          (self.slot_mapping, hb.slots + [-1] * pad), (self.seq_lens, hb.seq_lens + [1] * pad)):
            copy_to(buf[:size], torch.tensor(vals, dtype=buf.dtype))
        copy_to(self.block_tables[:size, :w], torch.from_numpy(padded_tables(hb.tables, w, size, 0)))

    def _forward(self, size: int) -> torch.Tensor:
        ctx = AttentionContext(
            cu_seqlens_q=self.cu_seqlens_q[:size + 1], seq_lens=self.seq_lens[:size],
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            cu_seqlens_q_list=list(range(size + 1)), decode_seqs=list(range(size)), max_seq_len=self.max_seq_len,
        )
        return self.model(self.input_ids[:size], self.positions[:size], ctx)

    def _capture(self, size: int) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self._forward(size)
        self.graphs[size] = (graph, hidden)


class ModelRunner:
    def __init__(self, model, model_cfg: ModelConfig, cfg: EngineConfig):
        self.model, self.model_cfg, self.cfg = model, model_cfg, cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            model.fuse_projections()  # the CPU keeps the reference path of each projection
        graphs = False
        if self.device.type == "cuda" and not cfg.enforce_eager:
            self._make_caches(cdiv(cfg.max_model_len, cfg.block_size))  # the least the graphs' buffers address
            graphs = all(c.decode_kernel for c in self.caches)
        reserve = self._graph_memory() if graphs else 0
        self.num_blocks = num_kv_blocks(cfg, model_cfg, model, reserve)
        if self.num_blocks * cfg.block_size < cfg.max_model_len:
            raise LowbitError(
                f"the KV cache holds {self.num_blocks * cfg.block_size} tokens, less than max_model_len "
                f"{cfg.max_model_len}: lower --max-model-len or raise --gpu-memory-utilization"
            )
        self._make_caches(self.num_blocks)
        if self.device.type == "cuda" and any(isinstance(c, QuantizedPagedKVCache) for c in self.caches):
            log.warning("this KV-cache format at block size %d has no attention kernel (int4 wants blocks of a power "
                        "of two >= 8 tokens; grouped or fp8 caches have none): decode runs the torch reference, "
                        "one sequence at a time", cfg.block_size)
        self._last = None  # the last launch's draws on the device, and each sampled sequence's row in them
        self.static_decode = StaticDecode(model, cfg, self.device, capture=True) if graphs else None
        if self.static_decode is not None:
            self.static_decode.capture_all()

    def _make_caches(self, num_blocks: int) -> None:
        self.caches = []
        for attn in self.model.attention_layers():
            attn.kv_cache = None  # the old cache is freed before the new one is allocated
            attn.kv_cache = make_kv_cache(num_blocks, self.cfg.block_size, self.model_cfg.num_kv_heads,
                                          self.model_cfg.head_dim, getattr(torch, self.cfg.dtype), self.device,
                                          attn.kv_spec)
            self.caches.append(attn.kv_cache)

    def _graph_memory(self) -> int:
        """Bytes that capturing every decode bucket holds, measured by a trial capture over a
        minimal cache (the graphs' memory depends on the batch shapes, not on the cache size; some
        libraries keep per-capture workspaces, so it is measured rather than estimated)."""
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        trial = StaticDecode(self.model, self.cfg, self.device, capture=True)
        trial.capture_all()
        torch.cuda.synchronize(self.device)
        used = torch.cuda.memory_allocated(self.device) - base
        del trial
        self._make_caches(0)
        gc.collect()
        torch.cuda.empty_cache()
        return used

    @torch.inference_mode()
    def launch(self, batch: list[ScheduledSeq]) -> "InFlight":
        """Queue the batch's forward and sampling on the device without waiting for them. An input
        token still PENDING (sampled by the previous launch, not yet read back) is taken from that
        launch's draws on the device."""
        hb = host_batch(batch, self.cfg.block_size)
        sampled = [i for i, item in enumerate(batch) if item.samples]
        patch = self._patch(batch, hb)
        static = self.static_decode
        if static is not None and len(hb.decode_seqs) == len(batch) <= static.max_batch:
            hidden = static.hidden(hb, patch)
            if sampled and len(sampled) < len(batch):
                hidden = hidden[to_device(sampled, torch.long, self.device)]
        else:
            input_ids, positions, ctx = prepare_inputs(hb, self.device)
            if patch is not None:
                patch(input_ids)
            hidden = self.model(input_ids, positions, ctx)
            if sampled:
                hidden = hidden[to_device([hb.cu[i + 1] - 1 for i in sampled], torch.long, self.device)]
        seqs = [batch[i].seq for i in sampled]
        draws = sample(hidden, self.model.compute_logits, seqs) if seqs else None
        self._last = None if draws is None else (draws.tokens, {seq.seq_id: r for r, seq in enumerate(seqs)})
        return InFlight(seqs, draws)

    def _patch(self, batch: list[ScheduledSeq], hb: HostBatch):
        """A function that writes the PENDING input ids of `hb` from the last launch's draws, or None."""
        dst, src = [], []
        for i, item in enumerate(batch):
            seq, start = item.seq, item.seq.num_computed_tokens
            for j in range(max(start, len(seq) - seq.num_pending), start + item.num_tokens):  # trailing ones only
                if seq.token_ids[j] == PENDING:
                    if self._last is None or seq.seq_id not in self._last[1]:
                        raise RuntimeError(f"sequence {seq.seq_id}: a pending input token the last launch did not draw")
                    dst.append(hb.cu[i] + j - start)
                    src.append(self._last[1][seq.seq_id])
        if not dst:
            return None
        tokens = self._last[0]
        dst_t, src_t = to_device(dst, torch.long, self.device), to_device(src, torch.long, self.device)

        def patch(input_ids: torch.Tensor) -> None:
            input_ids[dst_t] = tokens[src_t]
        return patch


@dataclass
class InFlight:
    """A launched step: the sequences it samples (batch order) and their draws, still on the device."""
    seqs: list[Sequence]
    draws: Sampled | None

    def result(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """Wait for the draws and read them back (the step's one device sync)."""
        return ([], []) if self.draws is None else self.draws.host()
