"""Brief, real, deterministic training: AdamW on a synthetic token stream, causal-LM or masked-LM loss.

A few dozen to a few hundred steps are enough for the properties the comparison relies on: norm weights move away
from 1, embeddings pick up the frequency structure of the stream (frequent ids get many updates, rare ids few),
and two models trained from different seeds on different data end up unrelated in their arbitrary axes.

Determinism: the weights depend only on the seeds and the settings, on one machine and library version. Training
runs single-threaded with ``torch.use_deterministic_algorithms(True)`` (both restored afterwards); the init comes
from ``torch.manual_seed(init_seed)``, the data from ``numpy.random.default_rng`` seeded by ``data_seed``, and the
masked-LM masks from a ``torch.Generator`` seeded by ``data_seed``; dropout (BERT) draws from the global generator,
which the builders seed and isolate with ``torch.random.fork_rng``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from hf_provenance.factory.data import TokenStream

MLM_MASK_PROB = 0.15  # BERT's recipe: of the chosen positions 80% [MASK], 10% a random token, 10% unchanged


@dataclass(frozen=True)
class TrainLog:
    """What one training run did: the per-step losses (mean over the batch) and the time it took."""

    objective: str
    steps: int
    lr: float
    losses: tuple[float, ...]
    seconds: float

    @property
    def loss_first(self) -> float:
        """Mean loss over the first 10 steps (or all, when fewer)."""
        head = self.losses[: min(10, len(self.losses))]
        return sum(head) / len(head) if head else math.nan

    @property
    def loss_last(self) -> float:
        """Mean loss over the last 10 steps (or all, when fewer)."""
        tail = self.losses[-min(10, len(self.losses)):]
        return sum(tail) / len(tail) if tail else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "steps": self.steps, "lr": self.lr,
                "loss_first": self.loss_first, "loss_last": self.loss_last,
                "losses": [round(x, 5) for x in self.losses], "seconds": round(self.seconds, 3)}


@contextlib.contextmanager
def deterministic(threads: int = 1) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads and deterministic algorithms, then restore both."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def train(model: torch.nn.Module, stream: TokenStream, *, objective: str, steps: int, lr: float, batch: int,
          seq_len: int, warmup: int = 10, weight_decay: float = 0.01, mlm: dict[str, int] | None = None
          ) -> TrainLog:
    """Train ``model`` in place for ``steps`` AdamW steps on batches from ``stream``.

    Args:
        objective: ``causal_lm`` (next-token loss through ``labels=input_ids``) or ``masked_lm``.
        steps, lr, batch, seq_len: the run; the learning rate warms up linearly over ``warmup`` steps and then
            decays linearly to 10% of ``lr``.
        weight_decay: AdamW's decoupled weight decay (applied to every parameter, as plain recipes do).
        mlm: for ``masked_lm``: ``{"mask_id", "n_special", "vocab_size"}``; special ids are never masked.

    Returns:
        The :class:`TrainLog`.
    """
    if objective not in ("causal_lm", "masked_lm"):
        raise ValueError(f"objective={objective!r} is not one of ['causal_lm', 'masked_lm']")
    if objective == "masked_lm" and not mlm:
        raise ValueError("objective='masked_lm' needs mlm={'mask_id', 'n_special', 'vocab_size'}")
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 1.0 - 0.9 * (step - warmup) / max(1, steps - warmup)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    masks = torch.Generator().manual_seed(int(stream.data_seed) + 0x3A5C)
    model.train()
    losses = []
    for _ in range(steps):
        ids = torch.from_numpy(stream.batch(batch, seq_len))
        if objective == "causal_lm":
            out = model(input_ids=ids, labels=ids)
        else:
            inputs, labels = _mask(ids, masks, **mlm)
            out = model(input_ids=inputs, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    model.eval()
    return TrainLog(objective, steps, lr, tuple(losses), time.perf_counter() - start)


def _mask(ids: torch.Tensor, gen: torch.Generator, *, mask_id: int, n_special: int, vocab_size: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose 15% of the ordinary positions; 80% → [MASK], 10% → random id, 10% unchanged."""
    ordinary = ids >= n_special
    chosen = (torch.rand(ids.shape, generator=gen) < MLM_MASK_PROB) & ordinary
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(n_special, vocab_size, ids.shape, generator=gen)[swap]
    return inputs, labels
