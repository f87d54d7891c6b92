"""The bucket plan (one graph per shape) and bucket suggestions from observed prompt lengths."""
from __future__ import annotations

from dataclasses import dataclass

from compile.config import CompileConfig


@dataclass(frozen=True)
class GraphSpec:
    """One bucket graph. `name` is also its file stem in graphs/."""

    # "prefill" (one prompt) | "prefill_packed" (cpu: several prompts end to end) | "prefill_ragged" (cpu with
    # Kiln's kernels: prefill_packed whose prompts may also resume after their slot's cached positions) |
    # "prefill_chunk" (a later chunk of a long prompt) | "decode" | "copy_slot" (neuron's device-side slot copy)
    kind: str
    seq_len: int = 0   # prefill: tokens per call
    batch: int = 0     # decode: rows per call; prefill_packed/prefill_ragged: prompts per call
    kv_len: int = 0    # decode: cached span; prefill_chunk: past span

    @property
    def name(self) -> str:
        if self.kind == "prefill":
            return f"prefill_s{self.seq_len}"
        if self.kind == "prefill_chunk":
            return f"prefill_chunk_s{self.seq_len}_p{self.kv_len}"
        if self.kind in ("prefill_packed", "prefill_ragged"):
            return f"{self.kind}_s{self.seq_len}_r{self.batch}"
        if self.kind == "copy_slot":
            return "copy_slot"
        return f"decode_b{self.batch}_k{self.kv_len}"

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "seq_len": self.seq_len,
                "batch": self.batch, "kv_len": self.kv_len}

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        """The spec of a manifest's graph entry (its name must be the one the spec gives)."""
        spec = cls(d["kind"], d.get("seq_len", 0), d.get("batch", 0), d.get("kv_len", 0))
        if d.get("name", spec.name) != spec.name:
            raise ValueError(f"graph {d.get('name')!r} does not match its shape ({spec.name})")
        return spec


def plan_graphs(cfg: CompileConfig, ragged_max_tokens: int = 0) -> list[GraphSpec]:
    """The graphs of an artifact. ragged_max_tokens > 0 (cpu graphs that call Kiln's kernels): the packed graphs
    up to that many tokens are prefill_ragged, which also take prompts that resume after cached positions, at the
    chunk sizes too (a 60-token rest after a prefix-cache hit then runs at 64, not at the smallest context
    bucket), so no prefill_chunk graphs are needed when they cover chunk_len."""
    if cfg.target == "cpu":
        ragged = {s for s in (*cfg.context_buckets, *cfg.chunk_sizes) if s <= ragged_max_tokens}
        # NOTE: a ragged call takes as many segments as sequences can run (decode rows ride it too: one token each)
        specs = [GraphSpec("prefill_ragged", seq_len=s, batch=min(s, cfg.max_num_seqs)) if s in ragged else
                 GraphSpec("prefill_packed", seq_len=s, batch=cfg.packed_rows(s))
                 for s in sorted(ragged | set(cfg.context_buckets))]
    else:
        specs = [GraphSpec("prefill", seq_len=s) for s in cfg.context_buckets]
    ragged_covers_chunks = any(s.kind == "prefill_ragged" and s.seq_len >= cfg.chunk_len for s in specs)
    if cfg.needs_chunk_graph and not ragged_covers_chunks:
        specs += [GraphSpec("prefill_chunk", seq_len=s, kv_len=p) for s in cfg.chunk_sizes for p in cfg.chunk_pasts]
    specs += [GraphSpec("decode", batch=b, kv_len=k) for b in cfg.batch_buckets for k in cfg.kv_buckets]
    return specs


def smallest_fitting(buckets: tuple[int, ...] | list[int], n: int) -> int:
    """The smallest bucket >= n (the caller guarantees one exists)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def padding_waste(lengths: list[int], buckets: list[int]) -> float:
    """Padded / computed positions when each length runs at its smallest fitting bucket."""
    computed = sum(smallest_fitting(buckets, n) for n in lengths)
    return (computed - sum(lengths)) / computed if computed else 0.0


def suggest_buckets(lengths: list[int], num_buckets: int, max_len: int) -> tuple[list[int], float]:
    """Bucket set of size <= num_buckets, the largest == max_len, minimising padding waste.

    Exact dynamic programme over the distinct observed lengths (a bucket edge only ever pays off
    at an observed length): O(num_buckets * distinct^2).
    """
    if not lengths:
        raise ValueError("no prompt lengths given")
    if max(lengths) > max_len:
        raise ValueError(f"a prompt length {max(lengths)} exceeds the largest allowed bucket {max_len}")
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n] = counts.get(n, 0) + 1
    edges = sorted(set(counts) | {max_len})
    # prefix sums of counts over edges, so the cost of a group is O(1)
    cum = [0]
    for e in edges:
        cum.append(cum[-1] + counts.get(e, 0))
    inf = float("inf")
    m = len(edges)
    # best[k][j]: min computed positions covering edges[:j+1] with k buckets, last bucket at edges[j]
    best = [[inf] * m for _ in range(num_buckets + 1)]
    back = [[-1] * m for _ in range(num_buckets + 1)]
    for j in range(m):
        best[1][j] = cum[j + 1] * edges[j]
    for k in range(2, num_buckets + 1):
        for j in range(m):
            for i in range(j):
                cost = best[k - 1][i] + (cum[j + 1] - cum[i + 1]) * edges[j]
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    k = min(range(1, num_buckets + 1), key=lambda kk: (best[kk][m - 1], kk))
    chosen, j = [], m - 1
    while j >= 0 and k >= 1:
        chosen.append(edges[j])
        j, k = back[k][j], k - 1
    chosen.sort()
    return chosen, padding_waste(lengths, chosen)
