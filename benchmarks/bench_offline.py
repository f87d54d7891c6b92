"""Offline throughput of the continuous-batching engine against padded-batch `transformers.generate`.

    python -m benchmarks.bench_offline --artifact ART --checkpoint smollm2-135m-instruct

For each max_num_seqs N: N prompts of --prompt-len tokens, --new-tokens each (ignore_eos, greedy),
run to completion through LLMEngine.generate; then the same N prompts through HF generate as one
padded batch, in the same dtype, in the same process. Prints a markdown table with output tokens
per second, the ratio, padding waste, and the median decode-step graph time per batch bucket.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from compile.dtypes import torch_dtype

from benchmarks.bench_graphs import hf_model
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.types import SamplingParams
from server.runner.artifact import load_artifact


class StepRecorder:
    """Engine observer that keeps what the benchmark reports."""

    def __init__(self):
        self.real = self.padded = 0
        self.decode_seconds: dict[int, list[float]] = defaultdict(list)

    def observe_step(self, stats) -> None:
        for run in stats.runs:
            self.real += run.num_real_tokens
            self.padded += run.num_padded_tokens
            if run.kind == "decode":
                batch = run.num_real_tokens + run.num_padded_tokens
                self.decode_seconds[batch].append(run.seconds)

    def observe_request(self, stats) -> None:
        pass

    def observe_token_gap(self, seconds: float) -> None:
        pass

    def observe_grammar_compile(self, kind: str, seconds: float) -> None:
        pass

    def median_decode_ms(self) -> float:
        """The median decode graph call of the largest batch seen (the one a full engine runs at)."""
        return statistics.median(self.decode_seconds[max(self.decode_seconds)]) * 1e3


def run_engine(runner, tokenizer, n: int, prompts: list[list[int]], params: SamplingParams) -> tuple[float, StepRecorder]:
    """(output tok/s, what the steps recorded) of one LLMEngine.generate of the prompts with max_num_seqs n,
    after a short warm-up generate on the same engine (not recorded)."""
    recorder = StepRecorder()
    engine = LLMEngine(runner, tokenizer, EngineConfig(max_num_seqs=n), observer=recorder)
    engine.generate([[1] * 8], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    recorder.__init__()
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    return sum(o.outputs[0].num_generated_tokens for o in outs) / (time.perf_counter() - start), recorder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()

    loaded = load_artifact(args.artifact)
    runner, tokenizer = loaded.runner, loaded.tokenizer
    dtype = torch_dtype(loaded.manifest.dtype)
    model = None if args.skip_hf else hf_model(args.checkpoint, dtype)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    # Both sides warmed up first: the runner as the server does at start-up, and
    # one short HF generate (its first call pays one-off costs too).
    runner.warmup()
    if model is not None:
        with torch.inference_mode():
            model.generate(torch.ones(2, 8, dtype=torch.long), max_new_tokens=4, do_sample=False, pad_token_id=0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {loaded.manifest.dtype}, "
          f"graph variant {loaded.manifest.graph_variant}, {args.prompt_len}-token prompts, "
          f"{args.new_tokens} new tokens")
    print("| max_num_seqs | Kiln tok/s | HF generate tok/s | ratio | padding waste | decode step ms (median) |")
    print("|---|---|---|---|---|---|")
    for n in [int(x) for x in args.batches.split(",")]:
        prompts = torch.randint(0, runner.vocab_size, (n, args.prompt_len), generator=gen).tolist()
        ours, recorder = run_engine(runner, tokenizer, n, prompts, params)
        waste = recorder.padded / max(1, recorder.real + recorder.padded)
        step_ms = recorder.median_decode_ms()
        ref = float("nan")
        if model is not None:
            ids = torch.tensor(prompts)
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            ref = n * args.new_tokens / (time.perf_counter() - start)
        print(f"| {n} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x | {waste:.1%} | {step_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
