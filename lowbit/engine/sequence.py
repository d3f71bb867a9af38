"""One generated sequence: its tokens, how many the KV cache already holds, and its KV blocks."""
from __future__ import annotations

import enum
import itertools

import torch

from lowbit.sampling_params import SamplingParams

_ids = itertools.count()
PENDING = -1  # a sampled token still on the device (asynchronous scheduling); never a model input


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Its tokens live in one list, prompt then outputs, that grows in place: the engine reads
    slices of it every step, so no property may rebuild it."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int | None = None):
        self.request_id, self.index, self.params, self.seed = request_id, index, params, seed
        self.seq_id = next(_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.output_logprobs: list = []
        self.output_text = ""
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # of the leading blocks published or reused
        self.num_preemptions = 0
        # the noise stream of its draws (`kernels.sampling`): the seed's, or a random one
        self.stream = (seed if seed is not None else int(torch.randint(0, 2 ** 32, ()))) & 0xFFFFFFFF
        self.num_pending = 0  # trailing PENDING tokens, whose values the engine has yet to read back

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens read back so far (a copy: append with `append_token`)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
