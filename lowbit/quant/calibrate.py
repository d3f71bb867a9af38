"""Calibration: sample token windows from text, and record what each linear layer sees."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from lowbit.data import WIKITEXT2_VALID
from lowbit.errors import LowbitError
from lowbit.quant.gptq import HessianAccumulator


def calibration_tokens(tokenizer, path: str | os.PathLike | None = None, samples: int = 128,
                       seq_len: int = 2048, seed: int = 0) -> torch.Tensor:
    """`[samples, seq_len]` windows at random offsets of the tokenized text (WikiText-2 validation
    by default; never the test split perplexity is measured on)."""
    path = Path(path) if path is not None else WIKITEXT2_VALID
    if samples < 1 or seq_len < 2:
        raise LowbitError(f"calibration needs samples >= 1 and length >= 2, got {samples} x {seq_len}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LowbitError(f"{path}: cannot read calibration text ({e.strerror or e})") from None
    tokens = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if tokens.numel() < seq_len:
        raise LowbitError(f"{path}: {tokens.numel()} tokens, shorter than one calibration sample of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])


class InputStats:
    """Per-input-channel statistics of one linear layer's inputs over the calibration tokens."""

    def __init__(self, k: int, device, hessian: bool = False, keep_tokens: int = 0):
        self.absmax = torch.zeros(k, device=device)
        self.sumsq = torch.zeros(k, device=device)
        self.count = 0
        self.hessian = HessianAccumulator(k, device) if hessian else None
        self.keep_tokens, self.kept = keep_tokens, []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.sumsq += x.pow(2).sum(0)
        self.count += x.shape[0]
        if self.hessian is not None:
            self.hessian.add(x)
        room = self.keep_tokens - sum(t.shape[0] for t in self.kept)
        if room > 0:
            self.kept.append(x[:: max(1, x.shape[0] // room)][:room].clone())

    def rescale(self, s: torch.Tensor) -> None:
        """Become the statistics of `x / s` (per channel, s > 0): the inputs once smoothing has divided
        their producer's channel j by `s_j`. Exact in arithmetic, so no second calibration pass."""
        s = s.to(self.absmax.device, torch.float32)
        self.absmax, self.sumsq = self.absmax / s, self.sumsq / s**2
        if self.hessian is not None:
            self.hessian.hessian /= s[:, None] * s[None, :]
        self.kept = [t / s for t in self.kept]

    def permute(self, perm: torch.Tensor) -> None:
        """Become the statistics of `x[..., perm]` (Atom's channel reorder)."""
        self.absmax, self.sumsq = self.absmax[perm], self.sumsq[perm]
        if self.hessian is not None:
            self.hessian.hessian = self.hessian.hessian[perm][:, perm]
        self.kept = [t[:, perm] for t in self.kept]

    @property
    def mean_square(self) -> torch.Tensor:
        return self.sumsq / max(self.count, 1)

    @property
    def samples(self) -> torch.Tensor:
        return torch.cat(self.kept) if self.kept else torch.empty(0, self.absmax.numel())


class Recorder:
    """Forward pre-hooks that feed `InputStats` for chosen linears (inputs as the weight sees them:
    after the layer's online Hadamard and an optional input permutation)."""

    def __init__(self, linears: dict[str, torch.nn.Module], perms: dict[str, torch.Tensor] | None = None,
                 hessian: bool = False, keep_tokens: int = 0, outputs: tuple[str, ...] = ()):
        self.stats: dict[str, InputStats] = {}
        self.out_absmax: dict[str, torch.Tensor] = {}
        self.handles = []
        perms = perms or {}
        for name, lin in linears.items():
            dev = lin.weight.device
            self.stats[name] = InputStats(lin.in_features, dev, hessian, keep_tokens)
            self.handles.append(lin.register_forward_pre_hook(self._input_hook(name, lin, perms.get(name))))
            if name in outputs:
                self.out_absmax[name] = torch.zeros(lin.out_features, device=dev)
                self.handles.append(lin.register_forward_hook(self._output_hook(name)))

    def _input_hook(self, name, lin, perm):
        from lowbit.quant.rotate import apply_hadamard

        def hook(module, args):
            x = args[0]
            if lin.online_hadamard:
                x = apply_hadamard(x)
            self.stats[name].add(x if perm is None else x[..., perm])
        return hook

    def _output_hook(self, name):
        def hook(module, args, out):
            self.out_absmax[name] = torch.maximum(self.out_absmax[name], out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float())
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
