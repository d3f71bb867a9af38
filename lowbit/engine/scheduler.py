"""Continuous batching: each step mixes decodes and (chunked) prefills under a token budget.

Every scheduled sequence contributes a run of its not-yet-cached tokens (one for a decode, a
chunk of the prompt for a prefill), so the model runner sees one uniform kind of work. When the
cache runs out of blocks, the youngest running sequence is preempted: its blocks are freed and
it is recomputed from its tokens later (recompute preemption).

With prefix caching, a sequence's full blocks are published once computed (at the next schedule,
after the step that filled them, or when it finishes), and a sequence leaving the waiting queue
starts on the cached blocks of its prompt's leading full blocks, so its budget covers only the rest.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lowbit.config import EngineConfig
from lowbit.engine.block_manager import BlockManager
from lowbit.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache instead of computed
        self.num_steps = self.num_scheduled_tokens = 0  # non-empty schedules, and the tokens they computed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.cfg.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        if self.cfg.enable_prefix_caching:
            for seq in self.running:
                self.blocks.publish(seq)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_grow(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, seq.num_computed_tokens + n)
                out.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a token not yet read back: recompute it next step
                break
            cached = self.blocks.reuse_prefix(seq) if self.cfg.enable_prefix_caching else 0
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq, cached + n):
                self.blocks.release(seq)  # gives back the reused blocks
                break
            self.waiting.popleft()
            self.blocks.grow(seq, cached + n)
            self.num_cached_tokens += cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        if out:
            self.num_steps += 1
            self.num_scheduled_tokens += self.cfg.max_num_batched_tokens - budget
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.cfg.enable_prefix_caching:
            self.blocks.publish(seq)
        self.blocks.release(seq)
