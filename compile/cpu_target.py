"""cpu target: torch.export of each bucket function, saved as a compact fx graph without weights.

Weights are graph *inputs* (see compile/model.py), so each graph file holds only the program; the
server binds the one stored safetensors copy at load time.

Graph file format (GRAPH_SUFFIX, gzip'd JSON, written by `compile_graph`, read by `load_graph`):
{"format": GRAPH_FORMAT, "version": GRAPH_FORMAT_VERSION, "nodes": [record, ...]} where each record
is [op, name, target, args, kwargs] of one node of the unlifted fx graph, in graph order:
  op       "placeholder" | "call_function" | "output"
  name     the node's name (a Python identifier; fx's own codegen prints it)
  target   placeholder: its argument name; call_function: a torch op as "namespace.op.overload"
           (e.g. "aten.mm.default"), resolved only through torch.ops (or "_operator.getitem"); Kiln's
           own ops ("kiln.rms_norm.default", compile/kernels) are loaded before the graph is built;
           output: "output"
  args     a JSON list, kwargs a JSON object, of values: null, booleans, ints, floats (NaN and
           Infinity as Python's json writes them), strings, lists, and one-key objects
           {"node": name} (an earlier node), {"tuple": [...]}, {"dtype": "bfloat16"},
           {"device": "cpu"}, {"layout": "strided"}, {"memory_format": "contiguous_format"}.
Nothing in the file is unpickled or executed: the loader rebuilds the fx.Graph node by node and fx
generates the Python source from it, as torch.export's own `.module()` does.
"""
from __future__ import annotations

import functools
import gzip
import json
import keyword
import operator
import zlib
from pathlib import Path

import torch
import torch.fx

from compile.buckets import GraphSpec
from compile.manifest import ArtifactError
from compile.model import (PORTABLE, DecodeGraph, ModelConfig, PackedPrefillGraph, PrefillChunkGraph, PrefillGraph,
                           RaggedPrefillGraph)

# NOTE: the JSON is ~25x smaller gzip'd, which keeps the artifact within a few percent of the
# weights' size even with dozens of buckets.
GRAPH_SUFFIX = ".fx.json.gz"
GRAPH_FORMAT = "kiln-fx-graph"
GRAPH_FORMAT_VERSION = 1

# Values of these types are written as {tag: name} and read back as getattr(torch, name),
# accepted only when it is an instance of the type (torch.device is built from its string).
_TAGGED_TYPES = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
# The only targets that are not torch ops: multi-output ops' results are taken apart with getitem.
_PYTHON_TARGETS = {"_operator.getitem": operator.getitem}


def example_inputs(spec: GraphSpec, cfg: ModelConfig, dtype: torch.dtype) -> tuple:
    """Inputs (after the weights) with exactly the bucket's shapes and dtypes."""
    i64 = torch.int64
    if spec.kind == "decode":
        span = (cfg.num_layers, spec.batch, cfg.num_kv_heads, spec.kv_len, cfg.head_dim)
        return (torch.zeros(spec.batch, dtype=i64), torch.zeros(spec.batch, dtype=i64),
                torch.zeros(span, dtype=dtype), torch.zeros(span, dtype=dtype))
    if spec.kind == "prefill_packed":  # input_ids, positions, segments [seq_len]; last_indices [batch]
        return (torch.zeros(spec.seq_len, dtype=i64), torch.zeros(spec.seq_len, dtype=i64),
                torch.zeros(spec.seq_len, dtype=i64), torch.zeros(spec.batch, dtype=i64))
    if spec.kind == "prefill_ragged":  # input_ids, positions, starts, slots [seq_len]; last_indices [batch]; caches
        # NOTE: a one-row, one-position cache: the graph only selects a layer of it and Kiln's kernel reads
        # the runner's cache at whatever size it has (checked there), so the artifact ties it to no row count.
        cache = (cfg.num_layers, 1, cfg.num_kv_heads, 1, cfg.head_dim)
        return (*(torch.zeros(spec.seq_len, dtype=i64) for _ in range(4)), torch.zeros(spec.batch, dtype=i64),
                torch.zeros(cache, dtype=dtype), torch.zeros(cache, dtype=dtype))
    ids, start, last = torch.zeros(spec.seq_len, dtype=i64), torch.tensor(0, dtype=i64), torch.tensor(0, dtype=i64)
    if spec.kind == "prefill":
        return ids, start, last
    past = (cfg.num_layers, cfg.num_kv_heads, spec.kv_len, cfg.head_dim)
    return ids, start, last, torch.zeros(past, dtype=dtype), torch.zeros(past, dtype=dtype)


def graph_module(spec: GraphSpec, cfg: ModelConfig, variant: str = PORTABLE) -> torch.nn.Module:
    return {"prefill": PrefillGraph, "prefill_packed": PackedPrefillGraph, "prefill_ragged": RaggedPrefillGraph,
            "prefill_chunk": PrefillChunkGraph, "decode": DecodeGraph}[spec.kind](cfg, variant)


def export_graph(spec: GraphSpec, cfg: ModelConfig, weights: list[torch.Tensor],
                 variant: str = PORTABLE) -> torch.export.ExportedProgram:
    """torch.export of one bucket; `.module()` of the result takes (weights, *inputs)."""
    args = (weights, *example_inputs(spec, cfg, weights[0].dtype))
    with torch.no_grad():
        program = torch.export.export(graph_module(spec, cfg, variant), args, strict=False)
    # NOTE: an ExportedProgram keeps its example inputs, which here include the weights.
    program._example_inputs = None
    return program


def keeps_full_weights(cfg) -> bool:
    """The target-backend interface compile/export.py calls (compile/neuron_target.py is the other):
    cpu graphs bind the stored HF weights, so the artifact keeps weights/model.safetensors."""
    return True


def write_weights(cfg, ckpt, tmp_dir: Path) -> list[str]:
    """Weight files beyond weights/model.safetensors: none on cpu."""
    return []


def manifest_section(cfg) -> dict:
    """The manifest's target section: none on cpu."""
    return {}


def compile_graph(spec: GraphSpec, compile_cfg, ckpt, weights: list[torch.Tensor], out_dir: Path,
                  variant: str = PORTABLE) -> str:
    """Export one bucket graph into out_dir; returns the file name.

    (compile_cfg: CompileConfig, ckpt: Checkpoint; weights: compile.cpu_kernels.graph_weights for variant.)"""
    program = export_graph(spec, ckpt.config, weights, variant)
    # Weights are inputs, so the program should hold no tensors; a lifted constant or buffer (a
    # torch.tensor(...) built inside compile/model.py, say) has no place in the graph file.
    held = [*program.state_dict, *program.constants]
    if held:
        raise RuntimeError(f"{spec.name}: the exported graph holds tensors {held[:5]}; the cpu graph format "
                           f"stores none (make them graph inputs or build them from inputs in compile/model.py)")
    graph = program.module().graph
    doc = graph_to_json(graph, spec.name)
    # NOTE: the file must give back exactly the program torch.export made: same nodes, same source.
    graph._codegen = torch.fx.graph.CodeGen()
    if _build_graph(json.loads(doc)).python_code("self").src != graph.python_code("self").src:
        raise RuntimeError(f"{spec.name}: the graph read back from its {GRAPH_SUFFIX} file differs from the export")
    name = spec.name + GRAPH_SUFFIX
    (out_dir / name).write_bytes(gzip.compress(doc.encode(), compresslevel=6, mtime=0))
    return name


def graph_to_json(graph: torch.fx.Graph, where: str = "graph") -> str:
    """The file format above for an unlifted export graph (placeholders, torch ops, one output)."""
    records = []
    for node in graph.nodes:
        at = f"{where}: node {node.name}"
        if node.op == "placeholder":
            if node.args or node.target != node.name:
                raise ValueError(f"{at}: a placeholder with a default value or another target ({node.target})")
            target = node.target
        elif node.op == "call_function":
            target = _target_name(node.target, at)
        elif node.op == "output":
            target = "output"
        else:
            raise ValueError(f"{at}: op {node.op} ({node.target}) is not stored; only placeholders, torch op "
                             f"calls and the output are")
        records.append([node.op, node.name, target, [_encode(a, at) for a in node.args],
                        {k: _encode(v, at) for k, v in node.kwargs.items()}])
    return json.dumps({"format": GRAPH_FORMAT, "version": GRAPH_FORMAT_VERSION, "nodes": records},
                      separators=(",", ":"))


def _target_name(target, at: str) -> str:
    for name, fn in _PYTHON_TARGETS.items():
        if target is fn:
            return name
    if not isinstance(target, torch._ops.OpOverload):
        raise ValueError(f"{at}: target {target!r} is not a torch op overload")
    name = f"{target.namespace}.{target._opname}.{target._overloadname}"
    if _resolve_target(name) is not target:
        raise ValueError(f"{at}: target {target!r} does not resolve back from {name!r}")
    return name


def _encode(value, at: str):
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, list):  # fx's immutable_list too
        return [_encode(v, at) for v in value]
    if type(value) is tuple:
        return {"tuple": [_encode(v, at) for v in value]}
    if type(value) is torch.device:
        return {"device": str(value)}
    for tag, kind in _TAGGED_TYPES.items():
        if type(value) is kind:
            return {tag: str(value).removeprefix("torch.")}
    raise ValueError(f"{at}: argument {value!r} of type {type(value).__name__} cannot be stored")


@functools.lru_cache(maxsize=None)
def _resolve_target(name: str):
    """A torch op overload from "namespace.op.overload", looked up only through torch.ops; else None."""
    if name in _PYTHON_TARGETS:
        return _PYTHON_TARGETS[name]
    parts = name.split(".")
    if len(parts) != 3 or not all(p.isidentifier() for p in parts):
        return None
    # (each step must be of torch.ops' own types: a dunder such as aten.__and__ is an op name, while
    # torch.ops.load_library or aten.mm.__call__ are not ops and are refused)
    namespace = getattr(torch.ops, parts[0], None)
    if not isinstance(namespace, torch._ops._OpNamespace):
        return None
    try:
        packet = getattr(namespace, parts[1])
        op = getattr(packet, parts[2]) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    except (AttributeError, RuntimeError):
        return None
    return op if isinstance(op, torch._ops.OpOverload) else None


class _Malformed(ValueError):
    pass


def _decode(value, nodes: dict):
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [_decode(v, nodes) for v in value]
    if type(value) is not dict or len(value) != 1:
        raise _Malformed(f"value {value!r:.80} is not one the format stores")
    (tag, inner), = value.items()
    if tag == "node":
        if type(inner) is not str or inner not in nodes:
            raise _Malformed(f"reference to {inner!r:.80}, which is not an earlier node")
        return nodes[inner]
    if tag == "tuple" and type(inner) is list:
        return tuple(_decode(v, nodes) for v in inner)
    if tag == "device" and type(inner) is str:
        try:
            return torch.device(inner)
        except RuntimeError:
            raise _Malformed(f"device {inner!r:.80} is not a torch device") from None
    if tag in _TAGGED_TYPES and type(inner) is str and inner.isidentifier():
        found = getattr(torch, inner, None)
        if type(found) is _TAGGED_TYPES[tag]:
            return found
    raise _Malformed(f"value {value!r:.80} is not one the format stores")


def _identifier(name) -> str:
    if type(name) is not str or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        raise _Malformed(f"name {name!r:.80} is not a plain Python identifier")
    return name


def _build_graph(doc) -> torch.fx.Graph:
    """The fx.Graph a graph file describes (flat positional inputs); raises _Malformed."""
    if type(doc) is not dict or doc.get("format") != GRAPH_FORMAT:
        raise _Malformed(f"not a {GRAPH_FORMAT} file")
    if doc.get("version") != GRAPH_FORMAT_VERSION:
        raise _Malformed(f"{GRAPH_FORMAT} version expected {GRAPH_FORMAT_VERSION}, found {doc.get('version')!r:.40}")
    records = doc.get("nodes")
    if type(records) is not list or not records:
        raise _Malformed("no nodes")
    graph = torch.fx.Graph()  # its default CodeGen: forward(self, *flat inputs), no pytree
    nodes: dict[str, torch.fx.Node] = {}
    inputs_done = False
    for i, record in enumerate(records):
        if type(record) is not list or len(record) != 5:
            raise _Malformed(f"node record {i} is not [op, name, target, args, kwargs]")
        op, name, target, args, kwargs = record
        name = _identifier(name)
        if type(args) is not list or type(kwargs) is not dict:
            raise _Malformed(f"node {name}: args must be a list and kwargs an object")
        if "output" in nodes:
            raise _Malformed(f"node {name} follows the output")
        if op == "placeholder":
            if args or kwargs or inputs_done or target != name:
                raise _Malformed(f"placeholder {name}: placeholders come first, are named by their target "
                                 f"and take no arguments")
            node = graph.create_node("placeholder", name, name=name)
        elif op == "call_function":
            inputs_done = True
            fn = _resolve_target(target) if type(target) is str else None
            if fn is None:
                raise _Malformed(f"node {name}: target {target!r:.80} is not a torch op")
            node = graph.create_node("call_function", fn, tuple(_decode(a, nodes) for a in args),
                                     {_identifier(k): _decode(v, nodes) for k, v in kwargs.items()}, name=name)
        elif op == "output":
            inputs_done = True
            if target != "output" or name != "output" or len(args) != 1 or kwargs:
                raise _Malformed("the output node must be ['output', 'output', 'output', [value], {}]")
            node = graph.output(_decode(args[0], nodes))
        else:
            raise _Malformed(f"node {name}: op {op!r:.40} is not placeholder, call_function or output")
        if node.name != name:  # a duplicate, or a name fx reserves (torch, inf, a builtin...)
            raise _Malformed(f"node name {name!r} is used twice or reserved")
        nodes[name] = node
    if "output" not in nodes:
        raise _Malformed("no output node")
    return graph


def _load_kernels_for(doc, path: Path) -> None:
    """Load Kiln's own ops (compile/kernels) before a graph that calls them is built, or say in one line
    why this host cannot run it."""
    records = doc.get("nodes") if type(doc) is dict else None
    if type(records) is not list or not any(type(r) is list and len(r) == 5 and type(r[2]) is str
                                            and r[2].startswith("kiln.") for r in records):
        return
    from compile.kernels import problem
    if why := problem():
        raise ArtifactError(f"{path}: the graph calls Kiln's cpu kernels, but {why}; install a C++ compiler "
                            f"or recompile with --cpu-kernels portable")


def load_graph(path: Path):
    """A callable with the bucket function's signature: (weights, *inputs) -> outputs.

    Raises ArtifactError (one line) for a file that is not a graph this Kiln wrote, including any
    target that is not a torch op."""
    path = Path(path)
    try:
        doc = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: unreadable graph file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                            ) from None
    _load_kernels_for(doc, path)
    try:
        graph = _build_graph(doc)
    except (_Malformed, RecursionError) as e:
        raise ArtifactError(f"{path}: malformed graph file ({e}); recompile the artifact") from None
    # NOTE: the graph is called with flat positional tensors: no pytree flattening and no input
    # shape checks (1.8 ms of a 22 ms SmolLM2 decode step with torch.export's module); the runner's
    # inputs have the bucket's shapes by construction (BucketedRunner).
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    return lambda weights, *inputs: module(*weights, *inputs)
