"""Structured outputs through the real engine, sampler and llguidance (FakeRunner logits, real tokenizer).

The fake model's logits are pseudo-random over SmolLM2's 49k vocabulary, so without the token
masks its output is never JSON: every valid result below is the constraint's doing.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_fakes import FakeRunner
from schema_strategies import json_schemas
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.structured import GrammarError
from server.engine.types import FinishReason, SamplingParams, StructuredOutputsParams

VOCAB = 49152
EOS = 2
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


class CompileCounter:
    def __init__(self):
        self.compiled, self.mask_steps = [], 0

    def observe_step(self, stats):
        self.mask_steps += stats.mask_seconds is not None

    def observe_request(self, stats):
        pass

    def observe_token_gap(self, seconds):
        pass

    def observe_grammar_compile(self, kind, seconds):
        self.compiled.append(kind)


def make_engine(tokenizer, observer=None, **config) -> LLMEngine:
    runner = FakeRunner(num_slots=8, max_model_len=1024, vocab_size=VOCAB, context_buckets=(16, 64),
                        batch_buckets=(1, 2, 4, 8), kv_buckets=(64, 256, 1024), eos_token_ids=(EOS,))
    return LLMEngine(runner, tokenizer, EngineConfig(**config), observer)


def json_params(schema, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 400)
    return SamplingParams(structured_outputs=StructuredOutputsParams(json=json.dumps(schema)), **kw)


@pytest.fixture(scope="module")
def engine(smollm2_tokenizer):
    return make_engine(smollm2_tokenizer)


def test_unconstrained_fake_output_is_not_json(engine):
    (out,) = engine.generate(["Give me JSON"], SamplingParams(max_tokens=20, temperature=0))
    with pytest.raises(ValueError):
        json.loads(out.outputs[0].text)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=1.3, n=3, seed=9),
                                      dict(temperature=0.7, top_p=0.9, top_k=50, n=2)])
def test_json_schema_output_validates(engine, sampling):
    (out,) = engine.generate(["Describe a person"], json_params(PERSON, **sampling))
    assert len(out.outputs) == sampling.get("n", 1)
    for choice in out.outputs:
        assert choice.finish_reason is FinishReason.STOP, choice
        jsonschema.validate(json.loads(choice.text), PERSON)
        assert EOS not in choice.token_ids        # the grammar's end stops the sequence at once


@pytest.mark.parametrize("spec, check", [
    (StructuredOutputsParams(regex=r"\d{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"\d{3}-[a-z]{2,4}", t)),
    (StructuredOutputsParams(choice=("yes", "no", "maybe")), lambda t: t in ("yes", "no", "maybe")),
    (StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'),
     lambda t: re.fullmatch(r"\(\d+(\+\d+)*\)", t)),
    (StructuredOutputsParams(grammar='start: "<" WORD ">"\nWORD: /[a-z]{1,5}/'), lambda t: re.fullmatch(r"<[a-z]{1,5}>", t)),
])
def test_regex_choice_and_grammar(engine, spec, check):
    # (json_object: any key length is allowed, which random logits never end; the e2e test covers it)
    outs = engine.generate(["x", "y"], SamplingParams(structured_outputs=spec, max_tokens=300, temperature=1.0, seed=1))
    for out in outs:
        assert out.outputs[0].finish_reason is FinishReason.STOP and check(out.outputs[0].text), out.outputs[0].text


def test_constrained_and_free_rows_share_steps_without_changing_each_other(engine):
    free = SamplingParams(max_tokens=12, temperature=0)
    constrained = json_params(PERSON, temperature=0)
    alone_free = engine.generate(["free text"], free)[0].outputs[0].token_ids
    alone_json = engine.generate(["json text"], constrained)[0].outputs[0].token_ids
    together = engine.generate(["free text", "json text", "free text"], [free, constrained, free])
    assert [o.outputs[0].token_ids for o in together] == [alone_free, alone_json, alone_free]


def test_grammars_compile_once_and_bad_ones_are_refused_before_queueing(smollm2_tokenizer):
    counter = CompileCounter()
    engine = make_engine(smollm2_tokenizer, counter)
    engine.generate(["a", "b"], [json_params(PERSON), json_params(PERSON)])
    engine.generate(["c"], json_params(json.loads(json.dumps(PERSON))))
    assert counter.compiled == ["json"] and counter.mask_steps > 0
    for bad in ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, {"type": "nope"}):
        with pytest.raises(GrammarError) as e:
            engine.check_request([1, 2], json_params(bad))
        assert e.value.field == "structured_outputs"
    with pytest.raises(GrammarError, match="regex"):
        engine.check_request([1], SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-")))
    assert not engine.has_unfinished()


def test_min_tokens_yields_to_a_complete_grammar(engine):
    # "yes" is a whole answer in a few tokens; min_tokens would ban eos longer than that
    (out,) = engine.generate(["q"], SamplingParams(structured_outputs=StructuredOutputsParams(choice=("yes",)),
                                                    min_tokens=10, max_tokens=20, temperature=0))
    assert out.outputs[0].text == "yes" and out.outputs[0].finish_reason is FinishReason.STOP


def test_logit_bias_steers_the_sampler(engine):
    target = 1000
    (out,) = engine.generate(["q"], SamplingParams(max_tokens=3, temperature=0, logit_bias=((target, 100.0),)))
    assert out.outputs[0].token_ids == [target] * 3
    (out,) = engine.generate(["q"], SamplingParams(max_tokens=3, temperature=0))
    banned = out.outputs[0].token_ids[0]
    (out,) = engine.generate(["q"], SamplingParams(max_tokens=1, temperature=0, logit_bias=((banned, -100.0),)))
    assert out.outputs[0].token_ids != [banned]


# ---- property: random schemas ---------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=json_schemas(), seed=st.integers(0, 2**31), temperature=st.sampled_from([0.0, 0.5, 1.0, 1.5]))
def test_random_schemas_give_valid_output(engine, schema, seed, temperature):
    (out,) = engine.generate(["Answer in JSON"], json_params(schema, temperature=temperature, seed=seed, max_tokens=600))
    choice = out.outputs[0]
    assert choice.finish_reason is FinishReason.STOP, (schema, choice.text)
    jsonschema.validate(json.loads(choice.text), schema)
