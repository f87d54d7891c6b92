"""`python -m compile`: turn a checkpoint into a Kiln artifact (or verify one, or suggest buckets)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compile.config import (AUTO_DTYPE, CPU_KERNELS, CPU_PREFIX_CACHE_ROWS, DEFAULT_CONTEXT_BUCKETS, DTYPES,
                            NEURON_PREFIX_CACHE_ROWS, NEURON_TARGETS, TARGETS, CompileConfig, ConfigError)
from compile.quantize import QUANTIZATIONS

EPILOG = """examples:
  python -m compile --checkpoint smollm2-135m-instruct --target cpu --out artifacts/smollm2
  python -m compile --checkpoint ./my-llama --dtype float32 --context-buckets 64,256 --max-model-len 512 --out a/
  python -m compile --verify artifacts/smollm2
  python -m compile --suggest-buckets prompt_lengths.txt --num-buckets 3
"""


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def powers_of_two_up_to(limit: int, start: int = 1, midpoints: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    """start, 2*start, .. up to limit (included); plus 1.5x each power in [midpoints[0], midpoints[1])."""
    values, v = [], start
    while v < limit:
        values.append(v)
        if midpoints[0] <= v < midpoints[1] and v * 3 // 2 < limit:
            values.append(v * 3 // 2)
        v *= 2
    return tuple(values) + (limit,)


# cpu defaults. NOTE: measured on the 2-core dev machine (SmolLM2, bf16), a decode step's attention reads
# its whole KV span for every row, so at batch 32 a step at span 512 cost 112 ms against 78 ms at 384;
# a 384 bucket and a batch-24 bucket keep the step near what its rows need. Neuron keeps powers of two
# (every graph there is a neuronx-cc compile and HBM).
CPU_MAX_NUM_SEQS = 32
CPU_BATCH_MIDPOINTS = (16, 32)     # adds 24
CPU_KV_MIDPOINTS = (256, 512)      # adds 384
# cpu prefill: a prompt arriving alone runs at the smallest bucket that holds it, so 192 and 384 cut the
# padding of prompts just over 128 and 256 (a 150-token prompt: 22% instead of 41%).
CPU_CONTEXT_BUCKETS = (128, 192, 256, 384, 512, 1024, 2048)
NEURON_MAX_NUM_SEQS = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compile", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile a Llama-family checkpoint (HF folder, .gguf, or a built-in name) into a Kiln "
                    "artifact: one static-shape graph per bucket, the weights stored once, and the tokenizer.")
    mode = p.add_argument_group("modes (default: compile)")
    mode.add_argument("--verify", metavar="DIR", type=Path, help="verify an artifact's manifest and checksums, then exit")
    mode.add_argument("--suggest-buckets", metavar="LENGTHS_FILE", type=Path,
                      help="print context-bucket sets minimising padding waste for the prompt lengths in the file")
    mode.add_argument("--num-buckets", type=int, default=3, help="largest bucket-set size to suggest (default 3)")
    mode.add_argument("--dry-run", action="store_true", help="print the compile plan and exit without compiling")
    c = p.add_argument_group("compile")
    c.add_argument("--checkpoint", help="HF folder, .gguf file, or built-in name (smollm2-135m-instruct)")
    c.add_argument("--out", type=Path, help="artifact folder to write")
    c.add_argument("--target", choices=TARGETS, default="cpu", help="device the graphs are for (default cpu)")
    c.add_argument("--dtype", choices=(AUTO_DTYPE, *DTYPES), default=AUTO_DTYPE,
                   help="weight and activation dtype; auto: bfloat16, except float32 for a cpu target on a CPU "
                        "without fast bf16 matmuls (AVX2 only, no AVX-512), where bf16 runs several times "
                        "slower (default auto)")
    c.add_argument("--context-buckets", type=int_list, metavar="S1,S2,..",
                   help=f"prefill lengths (default {','.join(map(str, DEFAULT_CONTEXT_BUCKETS))}; on cpu "
                        f"{','.join(map(str, CPU_CONTEXT_BUCKETS))}; capped at max-model-len)")
    c.add_argument("--batch-buckets", type=int_list, metavar="B1,B2,..",
                   help="decode batch sizes (default powers of two up to max-num-seqs; on cpu also 24 "
                        "when max-num-seqs is above 24)")
    c.add_argument("--kv-buckets", type=int_list, metavar="K1,K2,..",
                   help="decode attention spans (default powers of two from 128 up to max-model-len; on cpu "
                        "also 384 when max-model-len is above 384)")
    c.add_argument("--max-num-seqs", type=int, help=f"KV cache slots = largest decode batch (default "
                   f"{CPU_MAX_NUM_SEQS} on cpu, {NEURON_MAX_NUM_SEQS} on neuron)")
    c.add_argument("--max-model-len", type=int, default=2048, help="positions per sequence (default 2048)")
    c.add_argument("--prefix-cache-rows", type=int, metavar="N",
                   help=f"KV rows kept for the prefix cache, past --max-num-seqs: each holds one finished sequence's "
                        f"K/V for requests that repeat its start (default {CPU_PREFIX_CACHE_ROWS} on cpu, "
                        f"{NEURON_PREFIX_CACHE_ROWS} on neuron; 0: no prefix caching)")
    c.add_argument("--chunk-buckets", type=int_list, metavar="C1,C2,..",
                   help="token counts of the prefill-chunk graphs (a long prompt's later chunks, the rest of a prompt "
                        "after a prefix-cache hit); default the largest context bucket up to 512, and below it 64, 128 "
                        "and 256 on cpu, 128 on neuron. cpu graphs with Kiln's kernels compile ragged packed prefills "
                        "at these sizes instead, which take several such rests in one call")
    c.add_argument("--cpu-kernels", choices=CPU_KERNELS, default="auto",
                   help="cpu target: graphs with fused projections prepacked for oneDNN (cpu-onednn), or plain "
                        "aten ops any CPU runs (portable); auto picks cpu-onednn where it works (default auto)")
    c.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="weight-only int8 for the layers' projections: int8 weights with one scale per output "
                        "channel, about half the bytes; embeddings and lm_head stay in --dtype (default none)")
    c.add_argument("--force", action="store_true", help="replace an existing artifact built from other inputs")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    n = p.add_argument_group("neuron target")
    n.add_argument("--neuron-target", choices=NEURON_TARGETS, help="instance family the NEFFs are compiled for")
    n.add_argument("--tp-degree", type=int, default=1, help="tensor-parallel degree over NeuronCores (default 1)")
    n.add_argument("--neuron-compile-workers", type=int, metavar="N",
                   help="neuronx-cc processes run at once (default: as many as the host's free memory allows, "
                        "at most one per graph and per CPU; --dry-run shows the number)")
    return p


def config_from_args(args: argparse.Namespace) -> CompileConfig:
    cpu = args.target == "cpu"
    dtype = args.dtype
    if dtype == AUTO_DTYPE:
        from compile.cpu_kernels import resolve_dtype
        dtype = resolve_dtype(dtype, args.target)
        if not args.quiet:
            print(f"--dtype auto: {dtype}" + (" (this CPU has no fast bf16 matmul)" if dtype == "float32" else ""))
    max_len = args.max_model_len
    max_seqs = args.max_num_seqs or (CPU_MAX_NUM_SEQS if cpu else NEURON_MAX_NUM_SEQS)
    # the defaults below max_len, plus max_len itself when it is within them (past 2048 a longer
    # prompt is prefilled in chunks of the largest bucket)
    defaults = CPU_CONTEXT_BUCKETS if cpu else DEFAULT_CONTEXT_BUCKETS
    context = args.context_buckets or (tuple(s for s in defaults if s < max_len) + (
        (max_len,) if max_len <= defaults[-1] else ()))
    return CompileConfig(
        checkpoint=args.checkpoint, target=args.target, dtype=dtype, context_buckets=context,
        batch_buckets=args.batch_buckets or powers_of_two_up_to(max_seqs, midpoints=CPU_BATCH_MIDPOINTS if cpu else (0, 0)),
        kv_buckets=args.kv_buckets or powers_of_two_up_to(max_len, start=min(128, max_len),
                                                          midpoints=CPU_KV_MIDPOINTS if cpu else (0, 0)),
        max_num_seqs=max_seqs, max_model_len=max_len, neuron_target=args.neuron_target, tp_degree=args.tp_degree,
        cpu_kernels=args.cpu_kernels, quantization=args.quantization,
        neuron_compile_workers=args.neuron_compile_workers,
        prefix_cache_rows=args.prefix_cache_rows, chunk_buckets=args.chunk_buckets or None)


def run_suggest(path: Path, num_buckets: int, max_len: int) -> int:
    from compile.buckets import suggest_buckets
    try:
        lengths = [int(line) for line in path.read_text().split() if line.strip()]
    except (OSError, ValueError) as e:
        print(f"error: cannot read prompt lengths from {path}: {e}", file=sys.stderr)
        return 2
    print(f"{len(lengths)} prompt lengths, max {max(lengths) if lengths else 0}; largest bucket {max_len}")
    print(f"{'buckets':>8}  {'padding waste':>13}  bucket set")
    for k in range(1, num_buckets + 1):
        try:
            chosen, waste = suggest_buckets(lengths, k, max_len)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{k:>8}  {waste:>12.1%}  {','.join(map(str, chosen))}")
    return 0


def run_verify(path: Path) -> int:
    from compile.manifest import ArtifactError, verify_contract
    try:
        manifest = verify_contract(path)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ok: {path} ({manifest.target}, {manifest.dtype}, {len(manifest.graphs)} graphs, {len(manifest.files)} files verified)")
    return 0


def print_summary(result) -> None:
    rows = result.graph_rows
    width = max(len("bucket"), *(len(r[0]) for r in rows))
    print(f"\n{'bucket':<{width}}  {'graph size':>12}  {'compile s':>9}")
    for name, size, seconds in rows:
        print(f"{name:<{width}}  {size / 1024:>9.1f} KiB  {seconds:>9.2f}")
    total = sum(r[2] for r in rows)
    print(f"{'total':<{width}}  {sum(r[1] for r in rows) / 1024:>9.1f} KiB  {total:>9.2f}")
    ratio = result.artifact_bytes / result.weights_bytes if result.weights_bytes else 0.0
    quantization = result.manifest.model.get("quantization")
    print(f"weights ({result.manifest.dtype}{', ' + quantization if quantization else ''}): {result.weights_bytes / 2**20:.1f} MiB; "
          f"artifact: {result.artifact_bytes / 2**20:.1f} MiB ({ratio:.3f}x the weights)")
    print(f"artifact written to {result.out}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        return run_verify(args.verify)
    if args.suggest_buckets:
        return run_suggest(args.suggest_buckets, args.num_buckets, args.max_model_len)
    if not args.checkpoint or (not args.out and not args.dry_run):
        parser.error("--checkpoint and --out are required to compile")
    from compile.checkpoint import CheckpointError
    from compile.manifest import ArtifactError
    try:
        cfg = config_from_args(args)
        if args.target == "neuron" or args.dry_run:
            from compile import neuron_target
            if args.dry_run:
                print(neuron_target.describe_plan(cfg))
                return 0
            neuron_target.require_toolchain()
        from compile.export import build_artifact
        result = build_artifact(cfg, args.out, force=args.force, progress=not args.quiet)
    except (ConfigError, CheckpointError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no artifact was written", file=sys.stderr)
        return 130
    if result.up_to_date:
        print(f"{result.out} is up to date (same checkpoint and settings); nothing to do")
        return 0
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
