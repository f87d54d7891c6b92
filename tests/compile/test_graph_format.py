"""The cpu target's graph files (compile/cpu_target.py): what load_graph rebuilds computes exactly what
torch.export's own program computes, and a file naming anything but a torch op is refused unrun."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from compile.buckets import GraphSpec
from compile.cpu_kernels import graph_weights
from compile.cpu_target import GRAPH_FORMAT, GRAPH_SUFFIX, example_inputs, export_graph, graph_to_json, load_graph
from compile.manifest import ArtifactError, Manifest
from compile.model import ModelConfig


@pytest.fixture(scope="module")
def tiny(tiny_artifact):
    from safetensors.torch import load_file
    manifest = Manifest.read(tiny_artifact)
    cfg = ModelConfig.from_dict(manifest.model)
    weights = graph_weights(cfg, load_file(str(tiny_artifact / manifest.weights[0])), manifest.graph_variant)
    return manifest, cfg, weights


def run_inputs(spec: GraphSpec, cfg: ModelConfig, dtype: torch.dtype) -> tuple:
    """The bucket's inputs with values a real call could have (not the zeros it was exported with)."""
    gen = torch.Generator().manual_seed(len(spec.name))
    i64 = torch.int64

    def ids(n):
        return torch.randint(0, cfg.vocab_size, (n,), generator=gen)

    def cache(like):
        return torch.randn(like.shape, generator=gen).to(dtype)

    inputs = example_inputs(spec, cfg, dtype)
    if spec.kind == "decode":
        positions = torch.randint(0, spec.kv_len, (spec.batch,), generator=gen)
        return ids(spec.batch), positions, cache(inputs[2]), cache(inputs[3])
    if spec.kind == "prefill_packed":
        lengths = [spec.seq_len // 3, spec.seq_len // 4][:spec.batch]
        positions, segments, ends = [], [], []
        for i, n in enumerate(lengths):
            positions += range(n)
            segments += [i] * n
            ends.append(len(positions) - 1)
        pad = spec.seq_len - len(positions)
        return (ids(spec.seq_len), torch.tensor(positions + [0] * pad, dtype=i64),
                torch.tensor(segments + [len(lengths)] * pad, dtype=i64),
                torch.tensor((ends + [ends[-1]] * spec.batch)[:spec.batch], dtype=i64))
    if spec.kind == "prefill_ragged":  # a whole prompt (slot 0), then one resuming after 5 positions of slot 1
        lengths, starts = [spec.seq_len // 3, spec.seq_len // 4][:spec.batch], [0, 5]
        positions, first, slots, ends = [], [], [], []
        for i, n in enumerate(lengths):
            positions += range(starts[i], starts[i] + n)
            first += [starts[i]] * n
            slots += [i] * n
            ends.append(len(positions) - 1)
        pad = [0] * (spec.seq_len - len(positions))
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, 5 + spec.seq_len, cfg.head_dim)
        return (ids(spec.seq_len), *(torch.tensor(x + pad, dtype=i64) for x in (positions, first, slots)),
                torch.tensor((ends + [ends[-1]] * spec.batch)[:spec.batch], dtype=i64),
                torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
    last = torch.tensor(spec.seq_len - 3, dtype=i64)
    if spec.kind == "prefill":
        return ids(spec.seq_len), torch.tensor(0, dtype=i64), last
    start = torch.tensor((spec.kv_len - spec.seq_len) // 2, dtype=i64)
    return ids(spec.seq_len), start, last, cache(inputs[3]), cache(inputs[4])


def test_every_graph_equals_torch_exports_own_program(tiny_artifact, tiny):
    manifest, cfg, weights = tiny
    kinds = set()
    for entry in manifest.graphs:
        assert entry["file"].endswith(GRAPH_SUFFIX)
        spec = GraphSpec.from_dict(entry)
        kinds.add(spec.kind)
        inputs = run_inputs(spec, cfg, weights[0].dtype)
        exported = export_graph(spec, cfg, weights, manifest.graph_variant).module()
        with torch.inference_mode():
            ours = load_graph(tiny_artifact / entry["file"])(weights, *inputs)
            # NOTE: forward, not the call: torch.export's input checks would hold a ragged graph's cache to its
            # one-row example, where the graph (and Kiln's loader) takes the runner's cache at any size.
            theirs = exported.forward(weights, *inputs) if spec.kind == "prefill_ragged" else exported(weights, *inputs)
        assert len(ours) == len(theirs) == 3, spec.name
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype and a.shape == b.shape, spec.name
            assert torch.equal(a, b), f"{spec.name}: differs from torch.export's program"
    assert "decode" in kinds and kinds & {"prefill_packed", "prefill_ragged"}  # ragged: cpu-onednn with kernels


def rewrite(src: Path, dst: Path, change) -> Path:
    doc = json.loads(gzip.decompress(src.read_bytes()))
    change(doc["nodes"])
    dst.write_bytes(gzip.compress(json.dumps(doc).encode()))
    return dst


def first(nodes, op):
    return next(n for n in nodes if n[0] == op)


def set_target(target):
    def change(nodes):
        record = first(nodes, "call_function")
        record[2] = target
        record[3] = ["__import__('os').system('touch /tmp/kiln-pwned')"]
    return change


@pytest.fixture
def graph_file(tiny_artifact, tiny) -> Path:
    manifest = tiny[0]
    return tiny_artifact / next(g["file"] for g in manifest.graphs if g["kind"] == "decode")


@pytest.mark.parametrize("target", ["builtins.eval", "builtins.eval.default", "os.system.default",
                                    "load_library.x.default", "aten.mm", "aten.mm.__call__", "aten.no_such_op.default",
                                    "higher_order.cond.default", "torch.load", None, 3])
def test_a_target_that_is_not_a_torch_op_is_refused(graph_file, tmp_path, target):
    bad = rewrite(graph_file, tmp_path / f"bad{GRAPH_SUFFIX}", set_target(target))
    with pytest.raises(ArtifactError) as err:
        load_graph(bad)
    message = str(err.value)
    assert str(bad) in message and "is not a torch op" in message and repr(target)[:20] in message
    assert "\n" not in message
    assert not Path("/tmp/kiln-pwned").exists()


def rename_first_call(name):
    def change(nodes):
        first(nodes, "call_function")[1] = name
    return change


def set_first_arg(value):
    def change(nodes):
        first(nodes, "call_function")[3][0] = value
    return change


def prepend(record):
    def change(nodes):
        nodes.insert(0, record)
    return change


@pytest.mark.parametrize("change, expected", [
    (rename_first_call("x = __import__('os')"), "not a plain Python identifier"),
    (rename_first_call("torch"), "used twice or reserved"),
    (rename_first_call("weights_0"), "used twice or reserved"),
    (lambda nodes: nodes[1].__setitem__(2, "weights_0"), "placeholders come first, are named by their target"),
    (set_first_arg({"node": "not_a_node"}), "not an earlier node"),
    (set_first_arg({"dtype": "load"}), "not one the format stores"),
    (set_first_arg({"pickle": "gASV"}), "not one the format stores"),
    (prepend(["call_module", "m", "os", [], {}]), "is not placeholder, call_function or output"),
    (prepend(["get_attr", "m", "weight", [], {}]), "is not placeholder, call_function or output"),
    (lambda nodes: nodes.pop(), "no output node"),
])
def test_a_malformed_graph_file_is_refused(graph_file, tmp_path, change, expected):
    bad = rewrite(graph_file, tmp_path / f"bad{GRAPH_SUFFIX}", change)
    with pytest.raises(ArtifactError, match="malformed graph file") as err:
        load_graph(bad)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a torch.export .pt2 zip", gzip.compress(b"{not json"),
                                     gzip.compress(b'{"format": "other", "nodes": []}'),
                                     gzip.compress(json.dumps({"format": GRAPH_FORMAT, "version": 99}).encode())])
def test_a_file_that_is_not_a_kiln_graph_is_refused(tmp_path, content):
    path = tmp_path / f"graph{GRAPH_SUFFIX}"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=f"{path}: (unreadable|malformed) graph file"):
        load_graph(path)


def test_a_graph_holding_anything_but_torch_op_calls_is_not_written():
    class WithState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.scale

    with pytest.raises(ValueError, match="get_attr"):  # a module attribute (a constant tensor)
        graph_to_json(torch.fx.symbolic_trace(WithState()).graph)
    with pytest.raises(ValueError, match="not a torch op overload"):  # torch.relu, not aten.relu.default
        graph_to_json(torch.fx.symbolic_trace(lambda x: torch.relu(x)).graph)
