"""Kiln's own cpu kernels (torch ops in the `kiln` namespace), built from C++ on first use.

CPU_ONEDNN graphs call `torch.ops.kiln.decode_attention` (decode_attention.cpp: a decode step's attention,
read from the KV cache in place), `torch.ops.kiln.packed_attention` (the same file: a packed prefill's attention,
each token over its own prompt only), `torch.ops.kiln.ragged_attention` (the same file: a packed prefill whose
prompts may resume after a past already in their cache slots), `torch.ops.kiln.rms_norm` (rms_norm.cpp:
RMSNorm in one pass), `torch.ops.kiln.int8_linear` (int8_linear.cpp: int8 weights times a few rows, at memory
speed) and `torch.ops.kiln.rope` (rope.cpp: rope over q and k in one pass).
The op is built with torch's own extension builder into KILN_KERNEL_DIR (default ~/.cache/kiln/kernels),
once per host kind and source version, and loaded into the process before a graph that calls it is
traced or loaded. A host that cannot build it (no C++ compiler) gets one line saying why; compile then
traces the op-by-op versions instead (compile/model.py), and the server refuses graphs that need it.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path

import torch

OPS = ("decode_attention", "packed_attention", "ragged_attention", "rms_norm", "int8_linear", "rope")
HEADERS = [Path(__file__).with_name("widen.h")]
SOURCES = [Path(__file__).with_name(name) for name in ("decode_attention.cpp", "rms_norm.cpp",
                                                                "int8_linear.cpp", "rope.cpp")]


def kernel_dir() -> Path:
    return Path(os.environ.get("KILN_KERNEL_DIR", Path.home() / ".cache" / "kiln" / "kernels"))


def _host_tag() -> str:
    """Built with -march=native, so one build per CPU feature set (a shared cache across hosts stays safe)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    digest = hashlib.sha256()
    digest.update(f"{platform.machine()} {torch.__version__} {flags}".encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Build (once) and load the kernels; None on success, else why not (one line)."""
    if all(hasattr(torch.ops.kiln, op) for op in OPS):
        return None
    try:
        from torch.utils import cpp_extension
        name = f"kiln_kernels_{_host_tag()}"
        build = kernel_dir() / name
        build.mkdir(parents=True, exist_ok=True)
        march = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
        cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], build_directory=str(build),
                           extra_cflags=["-O3", "-fopenmp", *march], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:  # a compiler, ninja or linker failure: all mean "not on this host"
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return f"cannot build Kiln's cpu kernels here ({type(e).__name__}: {lines[-1][:200] if lines else ''})"
    _register_fakes()
    return None


def _register_fakes() -> None:
    """Shapes for tracing (torch.export runs the op on fake tensors)."""
    @torch.library.register_fake("kiln::decode_attention")
    def _(q, k, v, k_span, v_span, positions, scale, window, softcap):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kiln::packed_attention")
    def _(q, k, v, positions, segments, scale, window, softcap):
        return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))

    @torch.library.register_fake("kiln::ragged_attention")
    def _(q, k, v, positions, starts, slots, k_cache, v_cache, scale, window, softcap):
        return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))

    @torch.library.register_fake("kiln::rms_norm")
    def _(x, weight, eps, add_one):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kiln::int8_linear")
    def _(x, weight, scale):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("kiln::rope")
    def _(x, cos, sin):
        return x.new_empty(x.shape)


def problem() -> str | None:
    """Why this host cannot run the kernels, or None if it can (builds them on first call)."""
    return _load()

