"""Hands out fixed-size KV-cache blocks to sequences (a paged cache: no sequence owns a contiguous range).

Prefix caching: a full block whose tokens are computed is published under a chain hash (its parent
block's hash and its own token ids, so equal hashes mean equal whole prefixes). Blocks are
reference-counted; a published block whose last user lets go stays findable by hash on an LRU
"evictable" list until its slot is needed for something else.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from lowbit.engine.sequence import PENDING, Sequence


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block: a cryptographic digest, so that a crafted prompt cannot collide."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.ref = [0] * num_blocks  # sequences using each block
        self.block_hash: list[bytes | None] = [None] * num_blocks  # set while a block is published
        self.cached: dict[bytes, int] = {}  # hash -> published block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # published blocks at refcount 0, oldest first

    @property
    def num_free(self) -> int:
        """Blocks allocatable now: truly free ones plus cached ones nobody uses."""
        return len(self.free) + len(self.evictable)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs for its cache to hold `num_tokens` tokens."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        """A truly free block if any, else the least recently released cached one (losing its hash)."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref[block] = 1
        return block

    def reuse_prefix(self, seq: Sequence) -> int:
        """Start a fresh sequence on the cached blocks of its leading full blocks; return the tokens reused.

        At least the last token is left to compute, since its logits are needed to sample.
        """
        bs, tokens, parent = self.block_size, seq.token_ids, b""
        for i in range((len(seq) - 1) // bs):
            h = chain_hash(parent, tokens[i * bs:(i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref[block] == 0:
                del self.evictable[block]
            self.ref[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def publish(self, seq: Sequence) -> None:
        """Publish `seq`'s full blocks whose tokens are computed, so that later sequences can reuse them."""
        bs, tokens = self.block_size, seq.token_ids
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            if PENDING in tokens[i * bs:(i + 1) * bs]:  # a token not read back yet (asynchronous scheduling)
                break
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else b"", tokens[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            if h not in self.cached:  # else a twin computed the same block first: ours stays private
                self.cached[h] = seq.block_table[i]
                self.block_hash[seq.block_table[i]] = h

    def release(self, seq: Sequence) -> None:
        # tail blocks become evictable first: without its head block a cached tail is unreachable anyway
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0 and self.block_hash[block] is not None:
                self.evictable[block] = None
        self.free.extend(b for b in seq.block_table if self.ref[b] == 0 and self.block_hash[b] is None)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed_tokens = 0

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks
