"""Turns a scheduled batch into one forward pass: flat tokens, positions, attention metadata, sampling."""
from __future__ import annotations

import torch

from lowbit.config import EngineConfig, ModelConfig
from lowbit.engine.kv_cache import PagedKVCache, QuantizedPagedKVCache
from lowbit.engine.scheduler import ScheduledSeq
from lowbit.errors import LowbitError
from lowbit.layers.context import AttentionContext
from lowbit.layers.sampler import TokenLogprob, sample

CPU_KV_CACHE_TOKENS = 16384  # default cache size on the CPU, where free memory is not measured


def num_kv_blocks(cfg: EngineConfig, model_cfg: ModelConfig, model: torch.nn.Module) -> int:
    """Blocks that fit: the configured number, or (CUDA) what `gpu_memory_utilization` leaves free."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    per_block = cfg.block_size * sum(
        PagedKVCache.bytes_per_token(model_cfg.num_kv_heads, model_cfg.head_dim, getattr(torch, cfg.dtype), a.kv_spec)
        for a in model.attention_layers()
    )
    if cfg.device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        budget = free - (1 - cfg.gpu_memory_utilization) * total - 2**30  # 1 GiB for activations
        return max(0, int(budget // per_block))
    return max(CPU_KV_CACHE_TOKENS, 2 * cfg.max_model_len) // cfg.block_size


class ModelRunner:
    def __init__(self, model, model_cfg: ModelConfig, cfg: EngineConfig):
        self.model, self.model_cfg, self.cfg = model, model_cfg, cfg
        self.device = torch.device(cfg.device)
        self.num_blocks = num_kv_blocks(cfg, model_cfg, model)
        if self.num_blocks * cfg.block_size < cfg.max_model_len:
            raise LowbitError(
                f"the KV cache holds {self.num_blocks * cfg.block_size} tokens, less than max_model_len "
                f"{cfg.max_model_len}: lower --max-model-len or raise --gpu-memory-utilization"
            )
        shape = (self.num_blocks, cfg.block_size, model_cfg.num_kv_heads, model_cfg.head_dim,
                 getattr(torch, cfg.dtype), self.device)
        self.caches = []
        for attn in model.attention_layers():
            cache = PagedKVCache(*shape) if attn.kv_spec is None else QuantizedPagedKVCache(*shape, attn.kv_spec)
            attn.kv_cache = cache
            self.caches.append(cache)

    def _prepare(self, batch: list[ScheduledSeq]):
        ids, pos, slots, cu, lens, tables = [], [], [], [0], [], []
        bs = self.cfg.block_size
        for item in batch:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_tokens
            toks = seq.token_ids
            ids.extend(toks[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n))
            cu.append(cu[-1] + n)
            lens.append(start + n)
            tables.append(seq.block_table)
        width = max(len(t) for t in tables)
        table = [t + [-1] * (width - len(t)) for t in tables]
        dev = self.device
        ctx = AttentionContext(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(table, dtype=torch.int32, device=dev),
            cu_seqlens_q_list=cu,
            seq_lens_list=lens,
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev),
                torch.tensor(pos, dtype=torch.long, device=dev), ctx)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Forward the batch; sample for the sequences whose last token was computed (in batch order)."""
        input_ids, positions, ctx = self._prepare(batch)
        hidden = self.model(input_ids, positions, ctx)
        rows = [ctx.cu_seqlens_q_list[i + 1] - 1 for i, item in enumerate(batch) if item.samples]
        if not rows:
            return [], []
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        return sample(logits, [item.seq for item in batch if item.samples])
