"""Logits -> one token per row, with each row's own SamplingParams (vLLM v1 semantics).

Order, as in vLLM v1 (the grammar bitmask in the model runner, the rest in its Sampler):
structured-output rows keep only the tokens their grammar allows -> logit_bias -> ban tokens
(min_tokens masks eos and stop ids, unless that would leave a grammar row nothing) -> penalties
(repetition on prompt+output tokens; frequency and presence on output tokens) -> greedy rows
take the argmax; random rows: / temperature -> min_p -> top_k/top_p -> softmax -> sample.

NOTE: sampling never depends on a row's position in the batch. Every transform is row-wise,
and a random row draws its uniform (inverse-CDF sampling) from its own torch.Generator when
the request is seeded, so a seeded request reproduces whatever else is in the batch. The
sampler makes that generator the first time it sees the row's key and keeps it until the
engine releases the key. Unseeded rows share the sampler's generator.

Logprobs ("raw", the default, like vLLM v1's `raw_logprobs`): log-softmax of the model's
logits before bans, penalties, temperature and truncation; that is what OpenAI reports and it
does not change with temperature. "processed": log-softmax of the logits actually sampled
from (after penalties, temperature, min_p, top_k/top_p; truncated tokens get -inf).
One host transfer per step for the token ids and one for the logprobs, if any row asked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from server.engine.config import LOGPROBS_MODES
from server.engine.structured import TokenMasks, unpack_mask
from server.engine.types import SamplingParams, SamplingRow, TokenLogprob

SAMPLING_EPS = 1e-5   # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
TOP_P_CANDIDATES = 256


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Optional[TokenLogprob]]
    failed_rows: list[int] = field(default_factory=list)   # non-finite logits: tokens meaningless


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < SAMPLING_EPS or params.top_k == 1


class Sampler:
    def __init__(self, seed: Optional[int] = None):
        self._generator = torch.Generator(device="cpu")
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._seeded: dict[str, torch.Generator] = {}   # SamplingRow.key -> its own generator

    def release(self, keys: Sequence[str]) -> None:
        """Forget the generators of sequences that finished."""
        for key in keys:
            self._seeded.pop(key, None)

    def _row_generator(self, row: SamplingRow) -> Optional[torch.Generator]:
        if row.seed is None:
            return None
        gen = self._seeded.get(row.key)
        if gen is None:
            gen = self._seeded[row.key] = make_generator(row.seed)
        return gen

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow], logprobs_mode: str = "raw",
               token_masks: Optional[TokenMasks] = None) -> SamplerOutput:
        """logits: [len(rows), V]. Returns a token id (and logprobs when asked) per row."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"unknown logprobs_mode {logprobs_mode!r}")
        logits = logits.to(torch.float32, copy=True)
        # NOTE: a model can overflow (or a device misbehave) into NaN/inf; such a row would sample
        # garbage silently, so it is reported and sampled from zeros, and the engine fails its request.
        # One pass: a row's sum is non-finite when any of its logits is (inf, -inf and NaN all reach the sum; finite
        # logits would need to be near float32's limit to overflow it). 0.2 ms against isfinite().all()'s 3.5 ms
        # at 32 rows x 49k on the dev machine, where the whole sampler took 7 ms of a ~110 ms decode step.
        failed = (~torch.isfinite(logits.sum(dim=1))).nonzero().squeeze(1).tolist()
        if failed:
            logits[failed] = 0.0
        if token_masks is not None:
            _apply_token_masks(logits, token_masks)
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = None
        if lp_rows and logprobs_mode == "raw":
            raw_logprobs = torch.log_softmax(logits[lp_rows], dim=-1)
        _apply_logit_bias(logits, rows)
        _ban_tokens(logits, rows)
        _apply_penalties(logits, rows)
        greedy = [i for i, r in enumerate(rows) if is_greedy(r.params)]
        random = [i for i, r in enumerate(rows) if not is_greedy(r.params)]
        if not random:  # all greedy: no row gather (a copy of the logits)
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.empty(len(rows), dtype=torch.long)
        if greedy and random:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        if random:
            processed = self._process_random(logits[random], [rows[i] for i in random])
            tokens[random] = self._draw(processed, [rows[i] for i in random])
            if lp_rows and raw_logprobs is None:
                logits[random] = processed
        token_ids = tokens.tolist()
        if not lp_rows:
            return SamplerOutput(token_ids, [None] * len(rows), failed)
        if raw_logprobs is None:
            raw_logprobs = torch.log_softmax(logits[lp_rows], dim=-1)
        return SamplerOutput(token_ids, _gather_logprobs(raw_logprobs, tokens[lp_rows],
                                                         lp_rows, rows), failed)

    def _process_random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """[R, V] -> [R, V]: temperature, min_p, top_k/top_p (masked entries become -inf)."""
        temperature = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)
        logits = logits / temperature.unsqueeze(1)
        min_p_rows = [i for i, r in enumerate(rows) if r.params.min_p > 0.0]
        if min_p_rows:
            sub = logits[min_p_rows]
            probs = torch.softmax(sub, dim=-1)
            min_p = torch.tensor([rows[i].params.min_p for i in min_p_rows]).unsqueeze(1)
            sub.masked_fill_(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
            logits[min_p_rows] = sub
        vocab = logits.shape[1]
        trunc_rows = [i for i, r in enumerate(rows)
                      if 0 < r.params.top_k < vocab or r.params.top_p < 1.0]
        if trunc_rows:
            top_k = torch.tensor([_top_k(rows[i].params, vocab) for i in trunc_rows])
            top_p = [rows[i].params.top_p for i in trunc_rows]
            logits[trunc_rows] = _apply_top_k_top_p(logits[trunc_rows], top_k, top_p)
        return logits

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Inverse-CDF sampling with one uniform per row.
        NOTE: vLLM's exponential race (argmax(probs / q)) needs V random numbers per row;
        on CPU drawing them cost ~25 ms per step at batch 16 x 49k vocab, this ~2 ms."""
        probs = torch.softmax(logits, dim=-1)
        cdf = probs.cumsum_(dim=-1)
        u = torch.empty(len(rows), 1)
        generators = [self._row_generator(r) for r in rows]
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), 1, generator=self._generator)
        for i, gen in enumerate(generators):
            if gen is not None:
                u[i] = torch.rand(1, generator=gen)
        # first index whose cdf exceeds u * total: never a zero-probability token
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
        return tokens.clamp_(max=logits.shape[1] - 1)


def _top_k(params: SamplingParams, vocab: int) -> int:
    return params.top_k if 0 < params.top_k < vocab else vocab


def _apply_token_masks(logits: torch.Tensor, masks: TokenMasks) -> None:
    """Rows under a grammar keep only the tokens it allows (the others become -inf)."""
    allowed = torch.from_numpy(unpack_mask(masks.result(), logits.shape[1]))
    rows = torch.tensor(masks.rows, dtype=torch.long)
    logits[rows] = logits[rows].masked_fill_(~allowed, float("-inf"))


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids, biases = zip(*row.params.logit_bias)
            logits[i, list(ids)] += torch.tensor(biases, dtype=logits.dtype)


def _ban_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """min_tokens bans. NOTE: a grammar row whose grammar allows only banned tokens (it is complete
    and wants eos) keeps them: the grammar is the stronger rule, as a request cannot be both."""
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        banned = [t for t in row.banned_token_ids if 0 <= t < vocab]
        if banned:
            kept = logits[i].clone()
            logits[i, banned] = float("-inf")
            if not bool(torch.isfinite(logits[i]).any()):
                logits[i] = kept


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """vLLM's apply_penalties, on the rows that ask for any penalty."""
    idx = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0
           or r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0]
    if not idx:
        return
    sub = logits[idx]
    vocab = sub.shape[1]
    counts = torch.zeros_like(sub)
    seen = torch.zeros(sub.shape, dtype=torch.bool)
    for j, i in enumerate(idx):
        out = torch.tensor(rows[i].output_token_ids, dtype=torch.long)
        counts[j] = torch.bincount(out, minlength=vocab)[:vocab].to(sub.dtype)
        if rows[i].params.repetition_penalty != 1.0:
            seen[j, torch.tensor(rows[i].prompt_token_ids, dtype=torch.long)] = True
    seen |= counts > 0
    rep = torch.tensor([rows[i].params.repetition_penalty for i in idx]).unsqueeze(1)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([rows[i].params.frequency_penalty for i in idx]).unsqueeze(1)
    pres = torch.tensor([rows[i].params.presence_penalty for i in idx]).unsqueeze(1)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits[idx] = sub


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """[R, V]; top_k [R] (V = off), top_p per row (1.0 = off). Tokens tied with the last kept
    one are kept. NOTE: a full sort of a 49k vocab costs ~6 ms per row on CPU, so top-p first
    looks at the best `TOP_P_CANDIDATES` tokens and sorts only rows whose cut lies beyond them."""
    vocab = logits.shape[1]
    enabled_k = top_k[top_k < vocab]
    max_k = int(enabled_k.max()) if enabled_k.numel() else 0
    num_candidates = min(vocab, max(TOP_P_CANDIDATES, max_k))
    if num_candidates == vocab:
        values = logits.sort(dim=-1, descending=True).values
    else:
        values = logits.topk(num_candidates, dim=-1).values            # [R, C], descending
    kth = values.gather(1, (top_k.clamp(max=num_candidates) - 1).unsqueeze(1))
    kth[top_k >= vocab] = float("-inf")
    logits = logits.masked_fill(logits < kth, float("-inf"))
    p = torch.tensor(top_p, dtype=logits.dtype).unsqueeze(1)
    if bool((p >= 1.0).all()):
        return logits
    values = values.masked_fill(values < kth, float("-inf"))
    probs = torch.exp(values - torch.logsumexp(logits, dim=-1, keepdim=True))  # [R, C]
    before = probs.cumsum(dim=-1) - probs       # mass ranked strictly above each candidate
    keep = before < p
    covered = (probs.sum(dim=-1, keepdim=True) >= p) | (p >= 1.0)
    cutoff = values.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)
    cutoff[p.squeeze(1) >= 1.0] = float("-inf")
    uncovered = (~covered).squeeze(1).nonzero().squeeze(1).tolist()
    if uncovered:
        cutoff[uncovered] = _top_p_cutoff_by_sort(logits[uncovered], p[uncovered])
    return logits.masked_fill(logits < cutoff, float("-inf"))


def _top_p_cutoff_by_sort(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[R, V], p [R, 1] -> [R, 1]: the smallest logit top-p keeps, row by row. Only tokens
    with probability >= (1 - p) / V are sorted: the others hold less than 1 - p in total,
    so the cut is never among them."""
    vocab = logits.shape[1]
    lse = torch.logsumexp(logits, dim=-1)
    cutoffs = torch.empty(logits.shape[0], 1)
    for i in range(logits.shape[0]):
        floor = math.log((1.0 - float(p[i])) / vocab) + float(lse[i])
        values = logits[i][logits[i] >= floor].sort(descending=True).values
        probs = torch.exp(values - lse[i])
        keep = (probs.cumsum(dim=-1) - probs) < p[i]
        cutoffs[i] = values[keep].min()
    return cutoffs


def _gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, lp_rows: list[int],
                     rows: Sequence[SamplingRow]) -> list[Optional[TokenLogprob]]:
    """logprobs [L, V] for rows lp_rows; tokens [L] sampled there."""
    sampled = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    k = max(rows[i].params.logprobs for i in lp_rows)
    top_vals, top_ids = ([], [])
    if k > 0:
        top = logprobs.topk(k, dim=-1)
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    out: list[Optional[TokenLogprob]] = [None] * len(rows)
    token_list = tokens.tolist()
    for j, i in enumerate(lp_rows):
        num = rows[i].params.logprobs
        top_pairs = list(zip(top_ids[j][:num], top_vals[j][:num])) if num else []
        out[i] = TokenLogprob(token_id=token_list[j], logprob=sampled[j], top=top_pairs)
    return out
