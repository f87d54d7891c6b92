"""AsyncEngine: the loop thread, streams of deltas, aborts, back-pressure and failure."""
from __future__ import annotations

import asyncio
import threading

import pytest

from engine_fakes import CharTokenizer, FakeRunner
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.types import (EngineDeadError, FinishReason, QueueFullError,
                                 RequestTooLongError, SamplingParams)

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
TIMEOUT = 20


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def collect(stream):
    return [out async for out in stream]


class BlockingRunner(FakeRunner):
    """Decode waits for `release` (so the loop thread is provably busy)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.release = threading.Event()

    def decode(self, token_ids, positions):
        self.release.wait(TIMEOUT)
        return super().decode(token_ids, positions)


def test_streams_deltas_that_add_up_to_the_blocking_result():
    expected = LLMEngine(FakeRunner(), CharTokenizer()).generate(["abc", "hello"], GREEDY)

    async def main():
        engine = AsyncEngine(FakeRunner(), CharTokenizer(), EngineConfig())
        await engine.start()
        assert engine.is_alive()
        streams = [engine.add_request(f"r{i}", CharTokenizer().encode(p), GREEDY)
                   for i, p in enumerate(["abc", "hello"])]
        results = await asyncio.gather(*(collect(s) for s in streams))
        await engine.shutdown()
        assert not engine.is_alive()
        return results

    for outs, want in zip(run(main()), expected):
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
        assert sum((o.outputs[0].token_ids for o in outs), []) == want.outputs[0].token_ids
        assert "".join(o.outputs[0].text for o in outs) == want.outputs[0].text
        assert outs[-1].outputs[0].finish_reason is FinishReason.LENGTH


def test_abort_ends_the_stream_and_frees_the_slot():
    async def main():
        engine = AsyncEngine(FakeRunner(), CharTokenizer(), EngineConfig())
        await engine.start()
        stream = engine.add_request("a", [1, 2], SamplingParams(max_tokens=None, ignore_eos=True))
        first = await stream.__anext__()
        engine.abort("a")
        rest = await collect(stream)
        for _ in range(100):
            if engine.num_running == 0:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return first, rest, engine

    first, rest, engine = run(main())
    assert not first.finished and rest[-1].finished
    assert rest[-1].outputs[0].finish_reason is FinishReason.ABORT
    assert engine.engine.kv.num_used == 0 and engine.num_running == 0


def test_add_request_raises_at_once():
    async def main():
        runner = BlockingRunner()
        engine = AsyncEngine(runner, CharTokenizer(), EngineConfig(max_num_queued_reqs=2,
                                                                    max_num_seqs=1))
        with pytest.raises(EngineDeadError):
            engine.add_request("early", [1], GREEDY)   # not started
        await engine.start()
        with pytest.raises(RequestTooLongError):
            engine.add_request("long", [1] * 64, GREEDY)
        with pytest.raises(ValueError):
            engine.add_request("bad", [1], SamplingParams(temperature=-1.0))
        streams = [engine.add_request("a", [1], GREEDY)]
        await asyncio.sleep(0.2)                  # "a" runs; the loop blocks in its decode
        with pytest.raises(ValueError, match="in use"):
            engine.add_request("a", [1], GREEDY)
        streams += [engine.add_request("b", [1], GREEDY), engine.add_request("c", [1], GREEDY)]
        with pytest.raises(QueueFullError):
            engine.add_request("d", [1], GREEDY)
        assert engine.num_waiting == 2
        runner.release.set()
        outs = await asyncio.gather(*(collect(s) for s in streams))
        await engine.shutdown()
        return outs

    assert all(o[-1].outputs[0].finish_reason is FinishReason.LENGTH for o in run(main()))


def test_loop_failure_fails_live_streams_and_marks_the_engine_dead():
    async def main():
        runner = FakeRunner()
        engine = AsyncEngine(runner, CharTokenizer(), EngineConfig())
        await engine.start()
        runner.fail_on_decode = True
        stream = engine.add_request("a", [1, 2], GREEDY)
        with pytest.raises(EngineDeadError, match="injected decode failure"):
            await collect(stream)
        assert not engine.is_alive()
        with pytest.raises(EngineDeadError):
            engine.add_request("b", [1], GREEDY)
        await engine.shutdown()

    run(main())


def test_shutdown_aborts_in_flight_requests():
    async def main():
        runner = BlockingRunner()
        engine = AsyncEngine(runner, CharTokenizer(), EngineConfig())
        await engine.start()
        stream = engine.add_request("a", [1], SamplingParams(max_tokens=None, ignore_eos=True))
        task = asyncio.create_task(collect(stream))
        await asyncio.sleep(0.1)
        runner.release.set()
        await engine.shutdown()
        return await task

    outs = run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason is FinishReason.ABORT


def test_idle_loop_sleeps_instead_of_stepping():
    async def main():
        engine = AsyncEngine(FakeRunner(), CharTokenizer(), EngineConfig())
        steps = 0
        step = engine.engine.step

        def counting_step():
            nonlocal steps
            steps += 1
            return step()

        engine.engine.step = counting_step
        await engine.start()
        await collect(engine.add_request("a", [1], GREEDY))
        busy = steps
        await asyncio.sleep(0.3)
        idle = steps - busy
        await engine.shutdown()
        return busy, idle

    busy, idle = run(main())
    assert busy >= 10 and idle == 0


def test_real_runner_streams_through_the_async_engine(tiny_artifact):
    from server.runner.artifact import load_artifact
    loaded = load_artifact(tiny_artifact)
    tok = loaded.tokenizer

    async def main():
        engine = AsyncEngine(loaded.runner, tok, EngineConfig())
        await engine.start()
        streams = [
            engine.add_request("pair", tok.encode("Hello there"),
                               SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6)),
            engine.add_request("long", tok.encode("word " * 90),
                               SamplingParams(temperature=0.0, max_tokens=4, logprobs=1))]
        results = await asyncio.gather(*(collect(s) for s in streams))
        await engine.shutdown()
        return results

    pair, long = run(main())
    assert {c.index for o in pair for c in o.outputs} == {0, 1} and pair[-1].finished
    tokens = [t for o in long for c in o.outputs for t in c.token_ids]
    assert 1 <= len(tokens) <= 4 and long[-1].finished
    assert [lp.token_id for o in long for c in o.outputs for lp in c.logprobs] == tokens
