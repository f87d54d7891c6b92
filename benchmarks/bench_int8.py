"""int8 weights against the unquantised artifact: bytes, perplexity over a fixed text, decode speed.

    python -m benchmarks.bench_int8 --artifact ART --int8-artifact ART_INT8 [--batches 1,4,16,32]

Perplexity: the checkpoint (default SmolLM2-135M-Instruct) over FIXED_TEXT, every position's logits
from one causal pass of compile.model's prefill over the stored weights (eager, no artifact): the
dtype's weights, then int8 through both cpu graph variants' math (portable: the matmul on the int8
weight cast to the dtype, then the scales, as neuron does; cpu-onednn: torch's int8 kernel).
Speed: for each batch size, LLMEngine.generate of that many prompts (--prompt-len tokens, --new-tokens
each, greedy, ignore_eos) on each artifact, in alternating rounds (A, B, A, B, ...) so that the host's
drift hits both; the median of the rounds' output tok/s and of their decode steps' graph times.
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

# Public-domain English prose (the opening of Jerome K. Jerome's "Three Men in a Boat", 1889): text a
# trained model predicts well, fixed so that runs compare.
FIXED_TEXT = (
    "There were four of us - George, and William Samuel Harris, and myself, and Montmorency. We were sitting "
    "in my room, smoking, and talking about how bad we were - bad from a medical point of view I mean, of "
    "course. We were all feeling seedy, and we were getting quite nervous about it. Harris said he felt such "
    "extraordinary fits of giddiness come over him at times, that he hardly knew what he was doing; and then "
    "George said that he had fits of giddiness too, and hardly knew what he was doing. With me, it was my "
    "liver that was out of order. I knew it was my liver that was out of order, because I had just been "
    "reading a patent liver-pill circular, in which were detailed the various symptoms by which a man could "
    "tell when his liver was out of order. I had them all. It is a most extraordinary thing, but I never read "
    "a patent medicine advertisement without being impelled to the conclusion that I am suffering from the "
    "particular disease therein dealt with in its most virulent form.")


def all_position_logits(w, ids: torch.Tensor) -> torch.Tensor:
    """[S, vocab] float32: each position's next-token logits, from one causal pass of compile.model (a packed
    prefill of the one prompt that returns every position's logits)."""
    from compile.model import packed_prefill
    positions = torch.arange(ids.shape[0])
    logits, _, _ = packed_prefill(w, ids, positions, torch.zeros_like(positions), positions)
    return logits


def smollm2_perplexities(text: str = FIXED_TEXT, checkpoint: str = "smollm2-135m-instruct",
                         dtype: str = "bfloat16") -> dict[str, float]:
    """Perplexity of `text` under the checkpoint in `dtype`, and int8 through each cpu graph variant."""
    from compile.checkpoint import load_checkpoint
    from compile.cpu_kernels import graph_weights, onednn_problem
    from compile.dtypes import torch_dtype
    from compile.model import CPU_ONEDNN, PORTABLE, make_weights
    from compile.quantize import INT8, quantize_checkpoint
    ckpt = load_checkpoint(checkpoint, torch_dtype(dtype))
    ids = torch.tensor(ckpt.tokenizer(text)["input_ids"])
    int8 = quantize_checkpoint(ckpt, INT8)
    runs = {dtype: (ckpt, PORTABLE), "int8-portable": (int8, PORTABLE)}
    if onednn_problem(torch_dtype(dtype)) is None:
        runs["int8-cpu-onednn"] = (int8, CPU_ONEDNN)
    out = {}
    with torch.inference_mode():
        for label, (c, variant) in runs.items():
            w = make_weights(c.config, graph_weights(c.config, c.weights, variant), variant)
            logits = all_position_logits(w, ids)
            out[label] = math.exp(float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:])))
    out["tokens"] = int(ids.shape[0])
    return out


def weight_bytes(path) -> int:
    from compile.manifest import Manifest
    manifest = Manifest.read(path)
    return sum(f["size"] for rel, f in manifest.files.items() if rel.startswith("weights/"))


def engine_round(runner, tokenizer, n: int, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(output tok/s, median decode-step graph ms) of one LLMEngine.generate of n prompts."""
    from server.engine.types import SamplingParams

    from benchmarks.bench_offline import run_engine
    tok_s, recorder = run_engine(runner, tokenizer, n, prompts,
                                 SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
    return tok_s, recorder.median_decode_ms()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="the unquantised artifact")
    p.add_argument("--int8-artifact", required=True, help="the same checkpoint and buckets, --quantization int8")
    p.add_argument("--checkpoint", default="smollm2-135m-instruct", help="for the perplexity (default SmolLM2)")
    p.add_argument("--batches", default="1,4,16,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()

    from server.runner.artifact import load_artifact
    base, int8 = load_artifact(args.artifact), load_artifact(args.int8_artifact)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {base.manifest.dtype}, "
          f"graph variant {base.manifest.graph_variant}")
    wb, wq = weight_bytes(args.artifact), weight_bytes(args.int8_artifact)
    print(f"weights stored: {wb / 2**20:.1f} MiB, int8 {wq / 2**20:.1f} MiB ({wq / wb:.2f}x)")
    ppl = smollm2_perplexities(FIXED_TEXT, args.checkpoint, base.manifest.dtype)
    print(f"perplexity over FIXED_TEXT ({ppl.pop('tokens')} tokens): "
          + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())
          + "".join(f"; {k} / {base.manifest.dtype} {v / ppl[base.manifest.dtype]:.4f}" for k, v in ppl.items()
                    if k.startswith("int8")))
    for loaded in (base, int8):
        loaded.runner.warmup()
    gen = torch.Generator().manual_seed(0)
    print(f"| batch | {base.manifest.dtype} tok/s | int8 tok/s | int8 / base | {base.manifest.dtype} step ms | "
          f"int8 step ms | base / int8 step |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.batches.split(",")]:
        prompts = torch.randint(0, base.runner.vocab_size, (n, args.prompt_len), generator=gen).tolist()
        rounds = {"base": [], "int8": []}
        for _ in range(args.rounds):
            for label, loaded in (("base", base), ("int8", int8)):
                rounds[label].append(engine_round(loaded.runner, loaded.tokenizer, n, prompts, args.new_tokens))
        (bt, bs), (qt, qs) = ((statistics.median(r[0] for r in rounds[k]), statistics.median(r[1] for r in rounds[k]))
                              for k in ("base", "int8"))
        print(f"| {n} | {bt:.1f} | {qt:.1f} | {qt / bt:.2f}x | {bs:.1f} | {qs:.1f} | {bs / qs:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
