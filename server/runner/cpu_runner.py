"""Runs the cpu target's bucket graphs over one shared weight copy and a preallocated KV cache."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from compile.buckets import GraphSpec
from compile.dtypes import torch_dtype
from compile.manifest import ArtifactError, Manifest
from server.runner.bucketed import BucketedRunner, Chunk
from server.runner.interface import RunnerOutput


def check_host(manifest: Manifest, path: Path) -> None:
    """Refuse (ArtifactError, one line) cpu graphs this host cannot run: another torch release than
    they were exported with, or oneDNN-packed graphs where oneDNN cannot pack."""
    from compile.model import CPU_ONEDNN
    where = Path(path) / "manifest.json"
    built, here = manifest.versions.get("torch", "?"), torch.__version__
    if built.split(".")[:2] != here.split(".")[:2]:
        raise ArtifactError(f"{where}: graphs exported with torch {built}, this host has torch {here}; "
                            f"recompile the artifact here")
    if manifest.graph_variant == CPU_ONEDNN:
        from compile.cpu_kernels import onednn_problem
        if problem := onednn_problem(torch_dtype(manifest.dtype)):
            raise ArtifactError(f"{where}: graphs compiled with --cpu-kernels {CPU_ONEDNN}, but {problem}; "
                                f"recompile with --cpu-kernels portable")


# A step's decode rows ride its prefill call (CpuRunner.fused_decode) when that call's graph grows by at most this
# many tokens for them. NOTE: on the 2-vCPU Intel host a SmolLM2 decode call costs 24-39 ms at 1-8 rows and a ragged
# prefill about 0.18 ms more per token of its bucket, so 128 more tokens cost less than the call they replace.
FUSE_MAX_EXTRA_TOKENS = 128


class CpuRunner(BucketedRunner):
    """ModelRunner for target cpu (see server/runner/interface.py for the contract)."""

    def __init__(self, manifest: Manifest, path: Path):
        from safetensors.torch import load_file

        from compile.cpu_kernels import graph_weights
        from compile.cpu_target import load_graph
        super().__init__(manifest)
        dtype = torch_dtype(manifest.dtype)
        stored = load_file(str(path / manifest.weights[0]))
        self.weights = graph_weights(self.model, stored, manifest.graph_variant)
        del stored  # CPU_ONEDNN keeps packed copies; the plain ones they came from are freed
        self.graphs = {spec: load_graph(path / g["file"]) for spec, g in zip(self.specs, manifest.graphs)}
        self.packed = sorted(self.of_kind("prefill_packed"), key=lambda s: s.seq_len)
        m = self.model
        # [L, slots, kv_heads, max_len, head_dim] for both: see compile/model.py
        shape = (m.num_layers, self.num_cache_rows, m.num_kv_heads, self.max_model_len, m.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)

    def _run(self, kind: str, spec: GraphSpec, real: int, computed: int, *inputs):
        graph = self.graphs[spec]
        return self.timed(kind, spec.name, real, computed, lambda: graph(self.weights, *inputs))

    # ---- prefill ------------------------------------------------------------------------------
    def prefill_groups(self, chunks: Sequence) -> list[list]:
        """Chunks packed end to end, in order, into as few calls as the packed graphs take: whole prompts
        (and first chunks) into any, prompts that resume after cached positions (a prefix-cache hit's rest, a
        long prompt's later chunk) only into the ragged ones; without those, such a chunk runs alone on the
        chunk graph."""
        groups: list[list] = []
        for chunk in chunks:
            if groups and self.packed_spec(groups[-1] + [chunk]) is not None:
                groups[-1].append(chunk)
            else:
                groups.append([chunk])
        return groups

    def packed_spec(self, chunks: Sequence) -> Optional[GraphSpec]:
        """The smallest packed (or ragged) graph that takes these chunks in one call, None if none does."""
        total = sum(len(c.token_ids) for c in chunks)
        resumes = any(c.start_pos > 0 for c in chunks)
        graphs = self.ragged if resumes else self.ragged + self.packed
        fitting = [s for s in graphs if s.seq_len >= total and s.batch >= len(chunks)]
        return min(fitting, key=lambda s: s.seq_len) if fitting else None

    def fused_decode(self, decode, group: Sequence) -> Optional[list]:
        """With ragged graphs: decode row i (slot i, at its position) is a one-token segment that resumes after
        its cached positions, so it can ride the step's first prefill call, when that call's graph grows by at
        most FUSE_MAX_EXTRA_TOKENS for it."""
        if not self.ragged:
            return None
        rows = [Chunk(slot, [token], start_pos=position)
                for slot, (token, position) in enumerate(zip(decode.token_ids, decode.positions))]
        fused, alone = self.packed_spec(rows + list(group)), self.packed_spec(group)
        if fused is None or alone is None or fused.seq_len > alone.seq_len + FUSE_MAX_EXTRA_TOKENS:
            return None
        return rows + list(group)

    def run_prefill(self, chunks: Sequence) -> RunnerOutput:
        lengths = [len(c.token_ids) for c in chunks]
        if min(lengths) < 1:
            raise ValueError("an empty prefill chunk")
        spec = self.packed_spec(chunks)
        if spec is None and len(chunks) == 1 and chunks[0].start_pos > 0:
            return self.run_chunk(self.prefill_spec(lengths[0], chunks[0].start_pos), chunks[0])
        if spec is None:
            raise ValueError(f"a packed prefill of {len(chunks)} prompts, {sum(lengths)} tokens"
                             f"{' (some resuming)' if any(c.start_pos for c in chunks) else ''}, fits no graph")
        ids, positions, starts, slots, segments, ends = [], [], [], [], [], []
        for i, c in enumerate(chunks):
            n = len(c.token_ids)
            ids += c.token_ids
            positions += range(c.start_pos, c.end_pos)
            starts += [c.start_pos] * n
            slots += [c.slot] * n
            segments += [i] * n
            ends.append(len(ids) - 1)
        last = self.padded(ends, spec.batch, fill=ends[-1])
        total, padded_ids, padded_pos = len(ids), self.padded(ids, spec.seq_len), self.padded(positions, spec.seq_len)
        if spec.kind == "prefill_ragged":  # padding: position 0, start 0 (a segment of one token each)
            inputs = (self.padded(starts, spec.seq_len), self.padded(slots, spec.seq_len), last,
                      self.k_cache, self.v_cache)
        else:  # padding: a segment of its own (len(chunks)), so no prompt attends to it
            inputs = (self.padded(segments, spec.seq_len, fill=len(chunks)), last)
        (logits, new_k, new_v), run = self._run("prefill", spec, total, spec.seq_len, padded_ids, padded_pos, *inputs)
        offset = 0
        for c, n in zip(chunks, lengths):
            self.k_cache[:, c.slot, :, c.start_pos:c.end_pos] = new_k[:, :, offset:offset + n]
            self.v_cache[:, c.slot, :, c.start_pos:c.end_pos] = new_v[:, :, offset:offset + n]
            offset += n
        return RunnerOutput(logits=logits[:len(chunks)], run=run)

    def run_chunk(self, spec: GraphSpec, chunk) -> RunnerOutput:
        n, slot, start, past = len(chunk.token_ids), chunk.slot, chunk.start_pos, spec.kv_len
        (logits, new_k, new_v), run = self._run(
            "prefill_chunk", spec, n, spec.seq_len, self.padded(chunk.token_ids, spec.seq_len), torch.tensor(start),
            torch.tensor(n - 1), self.k_cache[:, slot, :, :past], self.v_cache[:, slot, :, :past])
        self.k_cache[:, slot, :, start:start + n] = new_k[:, :, :n]
        self.v_cache[:, slot, :, start:start + n] = new_v[:, :, :n]
        return RunnerOutput(logits=logits, run=run)

    # ---- decode and copies --------------------------------------------------------------------
    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> RunnerOutput:
        n = len(token_ids)
        spec = self.decode_spec(n, positions)
        batch, span = spec.batch, spec.kv_len
        pos = self.padded(positions, batch)
        # NOTE: slots 0..batch-1 as a view: no gather copy of the cache (docs/benchmarks.md).
        k_span = self.k_cache[:, :batch, :, :span]
        v_span = self.v_cache[:, :batch, :, :span]
        (logits, new_k, new_v), run = self._run("decode", spec, n, batch, self.padded(token_ids, batch), pos,
                                                k_span, v_span)
        rows, at = torch.arange(n), pos[:n]
        self.k_cache[:, rows, :, at] = new_k[:, :n].permute(1, 0, 2, 3)
        self.v_cache[:, rows, :, at] = new_v[:, :n].permute(1, 0, 2, 3)
        return RunnerOutput(logits=logits[:n], run=run)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        if src != dst and length > 0:
            self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
            self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    # ---- warm-up ------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Run the smallest graph of each kind once, then clear the cache.

        NOTE: measured on the 2-core dev machine, a cpu graph's first call costs at most ~10% more than
        its second (oneDNN and the thread pool start on the very first call of any graph), while running
        every graph once took 10 s of start-up for SmolLM2's 41 graphs (4 s of it the 2048-token prefill).
        So only one graph of each kind runs; the neuron runner still runs every tag (first calls load NEFFs)."""
        for kind in sorted({s.kind for s in self.specs}):
            self.warmup_calls(min(self.of_kind(kind), key=lambda s: (s.seq_len, s.batch, s.kv_len)))
        self.clear_cache()

    def warmup_calls(self, spec: GraphSpec) -> None:
        if spec.kind == "prefill_packed":
            per = spec.seq_len // spec.batch
            self.run_prefill([Chunk(i, [0] * per) for i in range(spec.batch)])
        elif spec.kind == "prefill_ragged":  # a whole prompt and one that resumes (both attention paths)
            half = spec.seq_len // 2
            self.run_prefill([Chunk(0, [0] * half), Chunk(1, [0] * (spec.seq_len - half), start_pos=half)])
        else:
            super().warmup_calls(spec)

    def clear_cache(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
