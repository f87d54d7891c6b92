"""Per-bucket latency of an artifact's graphs against the same computation in eager transformers.

    python -m benchmarks.bench_graphs --artifact ART --checkpoint smollm2-135m-instruct

Prefill: one prompt of S tokens (S = each context bucket). Decode: one step of B sequences
over a K-token cache (each batch and KV bucket). transformers runs the same shapes eagerly
(DynamicCache filled with random K/V), in the artifact's dtype, measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from compile.dtypes import torch_dtype


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_model(checkpoint: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from compile.checkpoint import resolve
    path = resolve(checkpoint)
    kw = {"gguf_file": path.name} if path.is_file() else {}
    folder = path.parent if path.is_file() else path
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw).eval()


def hf_decode_step(model, batch: int, span: int, dtype: torch.dtype):
    from transformers import DynamicCache
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        kv = torch.randn(batch, cfg.num_key_value_heads, span, head_dim, dtype=dtype)
        cache.update(kv, kv.clone(), layer)
    ids = torch.zeros(batch, 1, dtype=torch.long)
    mask = torch.ones(batch, span + 1, dtype=torch.long)

    def step():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the token just added: the span stays fixed across repeats
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--checkpoint", required=True, help="the checkpoint the artifact was compiled from")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="1,4,16", help="decode batch buckets to measure")
    p.add_argument("--spans", default="128,512,2048", help="decode KV buckets to measure")
    args = p.parse_args()

    from server.runner.artifact import load_artifact
    loaded = load_artifact(args.artifact)
    runner, manifest = loaded.runner, loaded.manifest
    dtype = torch_dtype(manifest.dtype)
    model = hf_model(args.checkpoint, dtype)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {manifest.dtype}")
    print(f"{'graph':<20} {'kiln ms':>9} {'eager HF ms':>12} {'ratio':>7}")
    for s in runner.context_buckets:
        ours = median_seconds(lambda: runner.prefill(0, [1] * s, 0), args.repeats)
        ids = torch.ones(1, s, dtype=torch.long)

        def hf_prefill():
            with torch.inference_mode():
                model(input_ids=ids, use_cache=True)
        ref = median_seconds(hf_prefill, args.repeats)
        print(f"prefill_s{s:<12} {ours * 1e3:>9.1f} {ref * 1e3:>12.1f} {ref / ours:>6.2f}x")
    wanted_b = [int(x) for x in args.batches.split(",")]
    wanted_k = [int(x) for x in args.spans.split(",")]
    for b in [x for x in runner.batch_buckets if x in wanted_b]:
        for k in [x for x in runner.kv_buckets if x in wanted_k]:
            ours = median_seconds(lambda: runner.decode([1] * b, [k - 1] * b), args.repeats)
            ref = median_seconds(hf_decode_step(model, b, k - 1, dtype), args.repeats)
            print(f"decode_b{b}_k{k:<10} {ours * 1e3:>9.1f} {ref * 1e3:>12.1f} {ref / ours:>6.2f}x")


if __name__ == "__main__":
    main()
