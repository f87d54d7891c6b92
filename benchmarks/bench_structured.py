"""What a structured-output constraint costs a decode step, against the same step unconstrained.

    python -m benchmarks.bench_structured --artifact ART [--batch 16] [--new-tokens 64]

Runs --batch prompts through LLMEngine.generate three ways, in the same process: all free, all
under a JSON schema, and half and half. Each run keeps only the steps where every row decodes
(a full decode batch) and groups them by the decode graph that ran (its KV bucket: the step cost
grows with it, and constrained rows finish sooner, at shorter lengths). For the buckets every kind
reached, it reports the median step time (graph, mask wait and apply, sampling, bookkeeping: all
of LLMEngine.step), the median time the grammar worker spent computing the step's masks
(overlapped with the graph), and the ratio to the free run's step in the same bucket.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.types import SamplingParams, StructuredOutputsParams
from server.runner.artifact import load_artifact

# a schema whose free-text fields let a long answer run: the cost per step is what is measured
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    "tags": {"type": "array", "items": {"type": "string"}}, "summary": {"type": "string"}},
    "required": ["title", "year", "tags", "summary"], "additionalProperties": False}
PROMPT = "<|im_start|>user\nDescribe a film you like as JSON.<|im_end|>\n<|im_start|>assistant\n"


class StepTimes:
    def __init__(self, batch: int):
        self.batch = batch
        self.steps: dict[str, list[float]] = defaultdict(list)    # decode bucket -> step seconds
        self.masks: dict[str, list[float]] = defaultdict(list)

    def observe_step(self, stats) -> None:
        decode = [r for r in stats.runs if r.kind == "decode"]
        if len(stats.runs) == 1 and decode and decode[0].num_real_tokens == self.batch:
            self.steps[decode[0].bucket].append(stats.step_seconds)
            if stats.mask_seconds is not None:
                self.masks[decode[0].bucket].append(stats.mask_seconds)

    def add(self, other: "StepTimes") -> None:
        for bucket, values in other.steps.items():
            self.steps[bucket] += values
        for bucket, values in other.masks.items():
            self.masks[bucket] += values

    def observe_request(self, stats) -> None:
        pass

    def observe_token_gap(self, seconds: float) -> None:
        pass

    def observe_grammar_compile(self, kind: str, seconds: float) -> None:
        pass


def run(loaded, batch: int, constrained: int, new_tokens: int) -> StepTimes:
    times = StepTimes(batch)
    engine = LLMEngine(loaded.runner, loaded.tokenizer, EngineConfig(max_num_seqs=batch), observer=times)
    spec = StructuredOutputsParams(json=json.dumps(SCHEMA))
    params = [SamplingParams(max_tokens=new_tokens, temperature=0.8, seed=i, ignore_eos=True,
                             structured_outputs=spec if i < constrained else None) for i in range(batch)]
    engine.generate([PROMPT] * batch, params)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind, interleaved")
    args = p.parse_args()
    loaded = load_artifact(args.artifact)
    loaded.runner.warmup()
    run(loaded, args.batch, args.batch, 4)      # first grammar use builds llguidance's tokenizer
    kinds = {"free": 0, "half constrained": args.batch // 2, "all constrained": args.batch}
    results: dict[str, StepTimes] = {k: StepTimes(args.batch) for k in kinds}
    for _ in range(args.repeats):
        for kind, constrained in kinds.items():
            results[kind].add(run(loaded, args.batch, constrained, args.new_tokens))
    common = sorted(set.intersection(*(set(t.steps) for t in results.values())))
    print(f"batch {args.batch}, {args.new_tokens} new tokens, temperature 0.8, {args.repeats} runs each; "
          f"steps where all {args.batch} rows decode, by decode graph")
    print("| decode graph | rows constrained | step ms (median) | mask compute ms (median, overlapped) | steps | vs free |")
    print("|---|---|---|---|---|---|")
    for bucket in common:
        base = statistics.median(results["free"].steps[bucket])
        for kind, times in results.items():
            step = statistics.median(times.steps[bucket])
            masks = times.masks.get(bucket)
            mask = f"{statistics.median(masks) * 1e3:.2f}" if masks else "-"
            print(f"| {bucket} | {kind} | {step * 1e3:.1f} | {mask} | {len(times.steps[bucket])} | "
                  f"{step / base:.3f}x |")


if __name__ == "__main__":
    main()
