"""Kiln's cpu kernels (compile/kernels) against the torch ops they replace, and what happens without them."""
from __future__ import annotations

import gzip
import json

import pytest
import torch
import torch.nn.functional as F

import compile.model
from compile import kernels
from compile.manifest import ArtifactError
from compile.model import split_attention

pytestmark = pytest.mark.skipif(kernels.problem() is not None, reason=f"{kernels.problem()}")


def reference_attention(q, k, v, k_span, v_span, positions, scale, window, cap):
    """compile/model.py split_attention in float64 (the portable graphs' decode attention)."""
    key_pos = torch.arange(k_span.shape[2])
    cached = key_pos[None, :] < positions[:, None]
    if window:
        cached &= key_pos[None, :] > positions[:, None] - window
    d = torch.float64
    return split_attention(q.to(d), k.to(d), v.to(d), k_span.to(d), v_span.to(d), cached[:, None, None, :], scale,
                           cap or None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,groups", [(64, 3), (128, 1), (32, 4)])  # 32: the loop for any head dim
@pytest.mark.parametrize("window,cap", [(0, 0.0), (5, 0.0), (0, 20.0)])
def test_decode_attention_matches_the_portable_attention(dtype, head_dim, groups, window, cap):
    g = torch.Generator().manual_seed(head_dim + groups + window)
    b, kv, span = 6, 2, 24
    # the spans are a slot-and-length view of a bigger cache, as the runner passes them (not contiguous)
    cache = torch.randn(b + 2, kv, 40, head_dim, generator=g).to(dtype)
    k_span, v_span = cache[:b, :, :span], cache.flip(0)[:b, :, :span]
    q = torch.randn(b, kv, groups, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(b, kv, head_dim, generator=g).to(dtype) for _ in range(2))
    positions = torch.tensor([0, 1, 7, 23, 24, 3])  # nothing cached, one, a window edge, the whole span
    out = torch.ops.kiln.decode_attention(q, k, v, k_span, v_span, positions, 0.3, window, cap)
    ref = reference_attention(q, k, v, k_span, v_span, positions, 0.3, window, cap)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.to(torch.float64), ref, atol=tol, rtol=tol)


def test_decode_attention_reads_only_each_rows_cached_positions():
    """Positions at or past a row's length (stale K/V of an earlier sequence in that slot) never count."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 1, 2, 64, generator=g), torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 64, generator=g)
    k_span, v_span = torch.randn(2, 1, 16, 64, generator=g), torch.randn(2, 1, 16, 64, generator=g)
    positions = torch.tensor([5, 9])
    before = torch.ops.kiln.decode_attention(q, k, v, k_span, v_span, positions, 0.125, 0, 0.0)
    k_span[0, :, 5:], v_span[0, :, 5:], k_span[1, :, 9:] = 1e4, -1e4, float("nan")
    assert torch.equal(torch.ops.kiln.decode_attention(q, k, v, k_span, v_span, positions, 0.125, 0, 0.0), before)


def test_decode_attention_refuses_mismatched_inputs():
    q, kv, span = torch.zeros(2, 1, 1, 64), torch.zeros(2, 1, 64), torch.zeros(2, 1, 8, 64)
    with pytest.raises(RuntimeError, match="positions must be int64"):
        torch.ops.kiln.decode_attention(q, kv, kv, span, span, torch.zeros(2, dtype=torch.int32), 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.kiln.decode_attention(q, kv, kv.bfloat16(), span, span, torch.zeros(2, dtype=torch.int64), 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match=r"spans must be \[B, KV, K, D\]"):
        torch.ops.kiln.decode_attention(q, kv, kv, span[:1], span[:1], torch.zeros(2, dtype=torch.int64), 1.0, 0, 0.0)


def reference_packed_attention(q, k, v, positions, segments, scale, window, cap):
    """The packed prefill's masked attention (compile/model.py packed_prefill's mask), in float64."""
    t, heads, d = q.shape
    groups = heads // k.shape[1]
    allowed = (segments[None, :] == segments[:, None]) & (positions[None, :] <= positions[:, None])
    if window:
        allowed &= positions[None, :] > positions[:, None] - window
    qd = q.double().transpose(0, 1)
    kd, vd = (x.double().repeat_interleave(groups, 1).transpose(0, 1) for x in (k, v))
    scores = qd @ kd.transpose(-1, -2) * scale
    if cap:
        scores = torch.tanh(scores / cap) * cap
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return (probs @ vd).transpose(0, 1).reshape(t, heads * d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 6, 2), (32, 4, 4)])
@pytest.mark.parametrize("window,cap", [(0, 0.0), (4, 0.0), (0, 20.0)])
def test_packed_attention_matches_the_packed_mask(dtype, head_dim, heads, kv_heads, window, cap):
    g = torch.Generator().manual_seed(head_dim + window)
    lengths, total = [5, 1, 9], 20  # three prompts, then padding (a segment of its own, positions 0)
    positions = torch.tensor([p for n in lengths for p in range(n)] + [0] * (total - sum(lengths)))
    segments = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)] + [3] * (total - sum(lengths)))
    q = torch.randn(total, heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(total, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    out = torch.ops.kiln.packed_attention(q, k, v, positions, segments, 0.2, window, cap)
    ref = reference_packed_attention(q, k, v, positions, segments, 0.2, window, cap)
    real = sum(lengths)  # padding rows' outputs are never read (they see only themselves here)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == (total, heads * head_dim)
    torch.testing.assert_close(out[:real].double(), ref[:real], atol=tol, rtol=tol)


def test_packed_attention_refuses_tokens_that_are_not_packed():
    q, kv = torch.zeros(4, 2, 32), torch.zeros(4, 1, 32)
    segments = torch.tensor([0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="token 2 is not packed"):  # position 2 after its segment's start
        torch.ops.kiln.packed_attention(q, kv, kv, torch.tensor([0, 1, 2, 3]), segments, 1.0, 0, 0.0)


def ragged_layout(segments, total):
    """positions, starts, slots [total] for segments (slot, start, n) packed in order, then padding."""
    positions, starts, slots = [], [], []
    for slot, start, n in segments:
        positions += range(start, start + n)
        starts += [start] * n
        slots += [slot] * n
    pad = total - len(positions)
    return (torch.tensor(x + [0] * pad) for x in (positions, starts, slots))


def reference_ragged_attention(q, k, v, positions, starts, slots, k_cache, v_cache, scale, window, cap):
    """Each token over its slot's cached positions < its segment's start, then its segment's tokens up to
    itself, in float64."""
    t, heads, d = q.shape
    groups = heads // k.shape[1]
    out = torch.empty(t, heads, d, dtype=torch.float64)
    for i in range(t):
        p, start, slot = int(positions[i]), int(starts[i]), int(slots[i])
        first = i - (p - start)
        keys = torch.cat((k_cache[slot, :, :start], k[first:i + 1].transpose(0, 1)), 1).double()
        values = torch.cat((v_cache[slot, :, :start], v[first:i + 1].transpose(0, 1)), 1).double()
        key_pos = torch.arange(keys.shape[1])
        allowed = key_pos > p - window if window else torch.ones_like(key_pos, dtype=torch.bool)
        for h in range(heads):
            scores = keys[h // groups] @ q[i, h].double() * scale
            if cap:
                scores = torch.tanh(scores / cap) * cap
            out[i, h] = torch.softmax(scores.masked_fill(~allowed, float("-inf")), 0) @ values[h // groups]
    return out.reshape(t, heads * d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 6, 2), (32, 4, 4)])
@pytest.mark.parametrize("window,cap", [(0, 0.0), (6, 0.0), (0, 20.0)])
def test_ragged_attention_matches_each_token_over_its_past_and_its_segment(dtype, head_dim, heads, kv_heads, window,
                                                                          cap):
    g = torch.Generator().manual_seed(head_dim + window)
    # a whole prompt, a rest after 30 cached positions, a one-token rest, a whole one-token prompt, a rest, padding
    segments, total = [(0, 0, 5), (2, 30, 7), (3, 9, 1), (1, 0, 1), (4, 3, 4)], 24
    positions, starts, slots = ragged_layout(segments, total)
    q = torch.randn(total, heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(total, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    # the runner's cache: [rows, KV, positions, D] of one layer, a view into [L, rows, ...] (not contiguous)
    k_cache, v_cache = (torch.randn(2, 6, kv_heads, 48, head_dim, generator=g).to(dtype)[1] for _ in range(2))
    out = torch.ops.kiln.ragged_attention(q, k, v, positions, starts, slots, k_cache, v_cache, 0.2, window, cap)
    ref = reference_ragged_attention(q, k, v, positions, starts, slots, k_cache, v_cache, 0.2, window, cap)
    real = sum(n for _, _, n in segments)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == (total, heads * head_dim) and out.dtype == dtype
    torch.testing.assert_close(out[:real].double(), ref[:real], atol=tol, rtol=tol)
    # whole prompts: what kiln.packed_attention gives them
    segment_ids = torch.tensor([i for i, (_, _, n) in enumerate(segments) for _ in range(n)] + [9] * (total - real))
    packed = torch.ops.kiln.packed_attention(q, k, v, positions - starts, segment_ids, 0.2, window, cap)
    whole = (starts == 0)[:real]
    assert torch.equal(out[:real][whole], packed[:real][whole])


def test_ragged_attention_reads_only_the_positions_before_each_start():
    """A slot's positions at or past the segment's start (stale K/V, or what this call writes) never count."""
    g = torch.Generator().manual_seed(1)
    positions, starts, slots = ragged_layout([(1, 6, 3), (0, 2, 2)], 6)
    q, k, v = torch.randn(6, 2, 64, generator=g), torch.randn(6, 1, 64, generator=g), torch.randn(6, 1, 64, generator=g)
    k_cache, v_cache = torch.randn(2, 1, 16, 64, generator=g), torch.randn(2, 1, 16, 64, generator=g)
    before = torch.ops.kiln.ragged_attention(q, k, v, positions, starts, slots, k_cache, v_cache, 0.125, 0, 0.0)
    k_cache[1, :, 6:], v_cache[0, :, 2:] = float("nan"), 1e4
    after = torch.ops.kiln.ragged_attention(q, k, v, positions, starts, slots, k_cache, v_cache, 0.125, 0, 0.0)
    assert torch.equal(after, before)


def test_ragged_attention_refuses_bad_layouts():
    q, kv, cache = torch.zeros(4, 2, 32), torch.zeros(4, 1, 32), torch.zeros(2, 1, 8, 32)
    call = lambda p, st, sl: torch.ops.kiln.ragged_attention(  # noqa: E731
        q, kv, kv, torch.tensor(p), torch.tensor(st), torch.tensor(sl), cache, cache, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="token 2 is not packed"):     # a new slot without a new segment
        call([3, 4, 5, 6], [3, 3, 3, 3], [0, 0, 1, 1])
    with pytest.raises(RuntimeError, match=r"token 0 at position 8 .* outside the cache \[2 rows, 8 positions\]"):
        call([8, 0, 0, 0], [8, 0, 0, 0], [0, 0, 0, 0])
    with pytest.raises(RuntimeError, match=r"token 1 .*slot 2\) is outside the cache"):
        call([0, 0, 0, 0], [0, 0, 0, 0], [0, 2, 0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (7, 40), (3, 5, 32)])
def test_rms_norm_matches_torch(dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    plain = F.rms_norm(x.float(), (shape[-1],), None, 1e-5)
    for add_one, expected in ((False, plain * w.float()), (True, plain * (1 + w.float()))):
        out = torch.ops.kiln.rms_norm(x, w, 1e-5, add_one)
        assert out.dtype == dtype and out.shape == x.shape
        # one rounding to the dtype: at most half a bf16 ulp from the float32 result
        torch.testing.assert_close(out.float(), expected.to(dtype).float(), atol=1e-5 if dtype == torch.float32 else 0,
                                   rtol=1e-5 if dtype == torch.float32 else 2 ** -8)


def test_rms_norm_of_a_column_slice():
    """The fused projections' outputs are sliced by columns before a norm (rows one stride apart)."""
    x = torch.randn(4, 64).to(torch.bfloat16)
    w = torch.randn(32).to(torch.bfloat16)
    assert torch.equal(torch.ops.kiln.rms_norm(x[:, 32:], w, 1e-6, False),
                       torch.ops.kiln.rms_norm(x[:, 32:].contiguous(), w, 1e-6, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,head_dim", [(1, 64), (37, 64), (5, 18)])  # 18: halves of 9, past no vector width
def test_rope_equals_the_torch_ops_bit_for_bit(dtype, tokens, head_dim):
    """q and k are a view of the fused qkv projection's output (heads H + KV of H + 2 KV): not contiguous."""
    g = torch.Generator().manual_seed(tokens + head_dim)
    qkv = (torch.randn(tokens, 15, head_dim, generator=g) * 4).to(dtype)
    qk = qkv[:, :12]
    angles = torch.randn(tokens, head_dim // 2, generator=g) * 50
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]
    out = torch.ops.kiln.rope(qk, cos, sin)
    assert out.dtype == dtype and out.shape == qk.shape and out.is_contiguous()
    assert torch.equal(out, compile.model.apply_rope(qk, cos, sin))


def test_rope_refuses_partial_rotary():
    x = torch.zeros(2, 3, 64)
    with pytest.raises(RuntimeError, match="full rotary only"):
        torch.ops.kiln.rope(x, torch.zeros(2, 1, 32), torch.zeros(2, 1, 32))


@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # 11: more rows than one register block of 8
@pytest.mark.parametrize("k", [64, 40])           # 40: a tail past the 16-wide loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_the_dequantised_matmul(rows, k, dtype):
    g = torch.Generator().manual_seed(rows * k)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randint(-127, 128, (70, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(70, generator=g) / 50).to(dtype)
    out = torch.ops.kiln.int8_linear(x, w, scale)
    exact = (x.double() @ w.double().T) * scale.double()
    assert out.dtype == dtype and out.shape == (rows, 70)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), exact, atol=tol, rtol=tol)
    if dtype == torch.bfloat16 and k % 16 == 0:  # the same numbers as torch's own int8 kernel it replaces
        torch.testing.assert_close(out, torch.ops.aten._weight_int8pack_mm(x, w, scale), atol=0, rtol=2 ** -7)


def test_int8_linear_refuses_a_float_weight():
    with pytest.raises(RuntimeError, match="the weight must be int8"):
        torch.ops.kiln.int8_linear(torch.zeros(1, 8), torch.zeros(4, 8), torch.ones(4))


def _kiln_targets(path) -> set[str]:
    from compile.manifest import Manifest
    found = set()
    for g in Manifest.read(path).graphs:
        nodes = json.loads(gzip.decompress((path / g["file"]).read_bytes()))["nodes"]
        found |= {n[2] for n in nodes if n[2].startswith("kiln.")}
    return found


def _variant(path) -> str:
    from compile.manifest import Manifest
    return Manifest.read(path).graph_variant


def test_onednn_graphs_call_the_kernels_and_a_host_without_them_refuses_in_one_line(tiny_artifact, monkeypatch):
    from compile.cpu_target import load_graph
    from compile.manifest import Manifest
    if _variant(tiny_artifact) != compile.model.CPU_ONEDNN:
        pytest.skip("oneDNN cannot pack here: the artifact is portable")
    # every prefill bucket of the tiny artifact is at most 512 tokens: all are ragged (kiln.ragged_attention)
    assert _kiln_targets(tiny_artifact) == {"kiln.decode_attention.default", "kiln.ragged_attention.default",
                                            "kiln.rms_norm.default", "kiln.rope.default"}
    decode = next(g for g in Manifest.read(tiny_artifact).graphs if g["kind"] == "decode")
    monkeypatch.setattr(kernels, "problem", lambda: "cannot build Kiln's cpu kernels here (no compiler)")
    with pytest.raises(ArtifactError, match=r"calls Kiln's cpu kernels, but cannot build .* --cpu-kernels portable"):
        load_graph(tiny_artifact / decode["file"])


def test_without_the_kernels_onednn_graphs_use_torch_ops(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """A host with no compiler still compiles cpu-onednn graphs (op by op), says so, and serves them."""
    from compile.config import CompileConfig
    from compile.export import build_artifact
    from server.runner.artifact import load_artifact
    from server.runner.bucketed import Chunk
    why = "cannot build Kiln's cpu kernels here (test)"
    monkeypatch.setattr(kernels, "problem", lambda: why)  # what compile (model.kernels_problem) asks
    out = tmp_path / "art"
    build_artifact(CompileConfig(checkpoint=str(tiny_llama_dir), context_buckets=(16,), batch_buckets=(1, 2),
                                 kv_buckets=(16, 32), max_model_len=32, max_num_seqs=2, prefix_cache_rows=0),
                   out, progress=False)
    if _variant(out) != compile.model.CPU_ONEDNN:
        pytest.skip("oneDNN cannot pack here: the artifact is portable")
    assert f"note: {why}; the graphs use op-by-op attention and norms" in capsys.readouterr().err
    assert _kiln_targets(out) == set()
    runner = load_artifact(out).runner
    assert torch.isfinite(runner.run_prefill([Chunk(0, [5, 6, 7])]).logits).all()
    assert torch.isfinite(runner.decode([8], [3]).logits).all()
