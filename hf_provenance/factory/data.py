"""Synthetic token streams with a realistic frequency profile, so that tiny models have something to learn.

A :class:`Language` is a fixed distribution over token ids: a Zipf–Mandelbrot unigram in which id order is
frequency rank (id ``n_special`` is the most frequent ordinary token, as in real tokenizers), and a first-order
Markov layer in which every token has a few preferred successors. A language is fully determined by
``(vocab_size, n_special, domain)``; which sequences are drawn from it, and in what order, is set by ``data_seed``.

``domain=0`` is the pre-training distribution. ``domain >= 1`` is "other data" for fine-tuning: the same
vocabulary with a shifted distribution — a steeper Zipf exponent, ranks shuffled locally (a domain's frequent
words differ a little from the general text's), and part of the successor table redrawn.

Example:
    >>> lang = Language(vocab_size=256, n_special=3)
    >>> batch = TokenStream(lang, data_seed=0, bos_id=1).batch(4, 16)
    >>> batch.shape
    (4, 16)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Profile of each domain: Zipf exponent, fraction of ranks shuffled locally, fraction of successor rows redrawn.
# Domain 0 is the pre-training text; the others are fine-tuning text. Adding a domain is a data edit.
DOMAINS: dict[int, dict[str, float]] = {
    0: {"zipf": 1.05, "rank_shuffle": 0.0, "successor_redraw": 0.0},
    1: {"zipf": 1.20, "rank_shuffle": 0.3, "successor_redraw": 0.5},
    2: {"zipf": 0.95, "rank_shuffle": 0.5, "successor_redraw": 0.8},
}
ZIPF_OFFSET = 2.7  # Zipf–Mandelbrot offset: flattens the head as measured word frequencies do
SUCCESSORS = 8  # preferred next tokens per token
MARKOV = 0.6  # probability that the next token is one of the current token's successors
_LANGUAGE_SEED = 0x5EED_1A46  # fixed: every model of a family sees the same language, whatever its seeds


@dataclass(frozen=True)
class Language:
    """A token distribution over ids ``[0, vocab_size)``; ids below ``n_special`` are never drawn.

    Args:
        vocab_size: size of the vocabulary, special tokens included.
        n_special: how many leading ids are special tokens (BOS, EOS, [MASK], ...).
        domain: key of :data:`DOMAINS`; 0 is the pre-training text, 1 and up are shifted "other data".
    """

    vocab_size: int
    n_special: int
    domain: int = 0
    unigram: np.ndarray = field(init=False, repr=False, compare=False)
    successors: np.ndarray = field(init=False, repr=False, compare=False)
    successor_weights: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.domain not in DOMAINS:
            raise ValueError(f"domain={self.domain!r} is not one of {sorted(DOMAINS)}")
        if not 0 <= self.n_special < self.vocab_size - SUCCESSORS:
            raise ValueError(f"vocab_size={self.vocab_size} is too small for n_special={self.n_special}")
        n = self.vocab_size - self.n_special
        base = DOMAINS[0]["zipf"]
        rng = np.random.default_rng([_LANGUAGE_SEED, self.vocab_size, self.n_special])
        unigram = 1.0 / (np.arange(n) + ZIPF_OFFSET) ** base
        unigram /= unigram.sum()
        successors = rng.choice(n, size=(n, SUCCESSORS), p=unigram)
        weights = 1.0 / np.arange(1, SUCCESSORS + 1)
        weights /= weights.sum()
        # Relabel ids by the stationary frequency of the whole chain, so that id order is frequency rank.
        order = np.argsort(-_stationary(unigram, successors, weights), kind="stable")
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        unigram, successors = unigram[order], inverse[successors[order]]
        if self.domain:
            profile = DOMAINS[self.domain]
            shift = np.random.default_rng([_LANGUAGE_SEED, self.vocab_size, self.n_special, self.domain])
            unigram = unigram[_shuffle_locally(shift, n, profile["rank_shuffle"])] ** (profile["zipf"] / base)
            unigram /= unigram.sum()
            redraw = shift.random(n) < profile["successor_redraw"]
            successors[redraw] = shift.choice(n, size=(int(redraw.sum()), SUCCESSORS), p=unigram)
        full = np.zeros(self.vocab_size)
        full[self.n_special :] = unigram
        object.__setattr__(self, "unigram", full)
        object.__setattr__(self, "successors", successors + self.n_special)
        object.__setattr__(self, "successor_weights", np.cumsum(weights))


def _stationary(unigram: np.ndarray, successors: np.ndarray, weights: np.ndarray, iters: int = 60) -> np.ndarray:
    """Stationary token frequencies of the chain "successor with prob MARKOV, else a unigram draw"."""
    pi = unigram.copy()
    for _ in range(iters):
        follow = np.zeros_like(pi)
        np.add.at(follow, successors.ravel(), (pi[:, None] * weights[None, :]).ravel())
        pi = (1 - MARKOV) * unigram + MARKOV * follow
    return pi


def _shuffle_locally(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """Ranks ``0..n-1`` where ``fraction`` of them swap with a neighbour up to ~10% of their rank away."""
    ranks = np.arange(n)
    for i in np.flatnonzero(rng.random(n) < fraction):
        j = min(n - 1, i + int(rng.integers(1, max(2, i // 10 + 2))))
        ranks[i], ranks[j] = ranks[j], ranks[i]
    return ranks


class TokenStream:
    """Seeded batches of token ids drawn from a :class:`Language`.

    Args:
        language: the distribution to draw from.
        data_seed: sets which sequences are drawn and in what order; a different seed gives different data.
        bos_id: when given, every sequence starts with it (decoder LMs).
        wrap: ``(first_id, last_id)`` to put around every sequence instead (``[CLS] ... [SEP]`` for BERT).
    """

    def __init__(self, language: Language, data_seed: int, *, bos_id: int | None = None,
                 wrap: tuple[int, int] | None = None):
        self.language = language
        self.data_seed = data_seed
        self.bos_id = bos_id
        self.wrap = wrap
        self._rng = np.random.default_rng([int(data_seed), language.domain, 0xDA7A])

    def batch(self, batch: int, seq_len: int) -> np.ndarray:
        """One ``(batch, seq_len)`` int64 array; successive calls continue the stream."""
        lang, rng = self.language, self._rng
        head = [self.bos_id] if self.bos_id is not None else ([self.wrap[0]] if self.wrap else [])
        tail = [self.wrap[1]] if self.wrap else []
        body = seq_len - len(head) - len(tail)
        out = np.empty((batch, body), dtype=np.int64)
        cdf = np.cumsum(lang.unigram)
        out[:, 0] = np.searchsorted(cdf, rng.random(batch) * cdf[-1], side="right")
        for t in range(1, body):
            fresh = np.searchsorted(cdf, rng.random(batch) * cdf[-1], side="right")
            pick = np.searchsorted(lang.successor_weights, rng.random(batch), side="right")
            pick = np.minimum(pick, SUCCESSORS - 1)
            follow = lang.successors[out[:, t - 1] - lang.n_special, pick]
            out[:, t] = np.where(rng.random(batch) < MARKOV, follow, fresh)
        np.clip(out, lang.n_special, lang.vocab_size - 1, out=out)
        parts = [np.full((batch, 1), i, dtype=np.int64) for i in head] + [out]
        parts += [np.full((batch, 1), i, dtype=np.int64) for i in tail]
        return np.concatenate(parts, axis=1)
