"""Hypothesis strategy for JSON schemas a grammar can bring to an end: objects (closed, some properties
required), arrays with maxItems, enums, nesting, integers and numbers with bounds, strings with maxLength,
booleans and null. Every value they allow is finite, so a constrained generation always completes."""
from __future__ import annotations

from hypothesis import strategies as st

NAMES = st.from_regex(r"[a-z]{1,6}", fullmatch=True)
LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 1000)),
    st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(1, 100)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 20)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text("abcxyz -", min_size=1, max_size=5), min_size=1, max_size=4, unique=True).map(
        lambda xs: {"enum": xs}),
)


def _objects(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required,
                              "additionalProperties": False}))


def json_schemas(max_leaves: int = 8):
    return st.recursive(LEAVES, lambda children: st.one_of(
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(0, 3)),
        _objects(children)), max_leaves=max_leaves)
