"""Prometheus metrics, named after vLLM's (`vllm:` -> `kiln:`) where the meaning is the same.

One `Metrics` object per server process owns its own CollectorRegistry (so tests can build
several). It is fed from the engine's StepStats / RequestStats, never from inside kernels.
docs/metrics.md lists each metric with its vLLM twin.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.engine.types import RequestStats, StepStats

# vLLM's buckets, extended down to 1 ms for Neuron-fast steps and up for slow CPU runs.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                           20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
MASK_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
GRAPH_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                         1.28, 2.56, 5.12, 10.24)

PREFIX = "kiln:"


class Metrics:
    """All Kiln metrics, labelled with model_name like vLLM's."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]

        def gauge(name, doc, labels=()):
            return Gauge(PREFIX + name, doc, [*m, *labels], registry=r)

        def counter(name, doc, labels=()):
            return Counter(PREFIX + name, doc, [*m, *labels], registry=r)

        def histogram(name, doc, buckets, labels=()):
            return Histogram(PREFIX + name, doc, [*m, *labels], buckets=buckets, registry=r)

        self.num_requests_running = gauge("num_requests_running", "Requests holding a KV slot.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting for a KV slot.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV slots in use (0-1).")
        self.padding_waste_ratio = gauge(
            "padding_waste_ratio", "Padded / computed positions since start (cumulative).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests.")
        self.request_success = counter(
            "request_success", "Finished requests by finish reason.", ["finished_reason"])
        self.steps = counter("steps", "Graph executions by bucket.", ["kind", "bucket"])
        self.real_tokens = counter("real_tokens", "Positions computed for real tokens.")
        self.padded_tokens = counter("padded_tokens", "Positions computed only as bucket padding.")
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between successive tokens of a request.", ITL_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to finish.", REQUEST_LATENCY_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first admission into a KV slot.",
            REQUEST_LATENCY_BUCKETS)
        self.graph_execution_seconds = histogram(
            "graph_execution_seconds", "Wall time of one bucket graph execution.",
            GRAPH_SECONDS_BUCKETS, ["kind", "bucket"])
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request (all n choices).",
            TOKEN_COUNT_BUCKETS)
        self.num_requests_rejected = counter(
            "num_requests_rejected", "Requests refused before admission: queue_full (429) or draining (503).",
            ["reason"])
        self.structured_output_requests = counter(
            "structured_output_requests", "Requests under a structured-output constraint, by kind "
            "(json, json_object, regex, choice, grammar; tool_choice required/named count as json).", ["kind"])
        self.grammar_compile_seconds = histogram(
            "grammar_compile_seconds", "Compiling one structured-output constraint (cache misses only).",
            MASK_SECONDS_BUCKETS, ["kind"])
        self.structured_output_mask_seconds = histogram(
            "structured_output_mask_seconds", "Computing the token masks of one step's constrained rows.",
            MASK_SECONDS_BUCKETS)
        # prefix cache, counted in tokens as vLLM's vllm:prefix_cache_queries / vllm:prefix_cache_hits
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache (admitted requests).")
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache (copied, not prefilled).")
        self.prefix_cache_stores = counter(
            "prefix_cache_stores", "Finished sequences whose K/V went into a prefix-cache row.")
        self.prefix_cache_evictions = counter(
            "prefix_cache_evictions", "Prefix-cache rows overwritten by another sequence (least recently used).")
        self.prefix_cache_rows = gauge(
            "prefix_cache_rows", "Prefix-cache rows holding a cached sequence (Kiln's unit of storage; vLLM's "
            "is a 16-token block).")
        self.prefix_cache_tokens = gauge("prefix_cache_tokens", "Tokens held in the prefix cache's rows.")
        self._real = 0
        self._padded = 0

    def observe_step(self, stats: StepStats) -> None:
        name = self.model_name
        self.num_requests_running.labels(name).set(stats.num_running)
        self.num_requests_waiting.labels(name).set(stats.num_waiting)
        if stats.num_slots_total:
            self.kv_cache_usage_perc.labels(name).set(stats.num_slots_used / stats.num_slots_total)
        for run in stats.runs:
            self.steps.labels(name, run.kind, run.bucket).inc()
            self.graph_execution_seconds.labels(name, run.kind, run.bucket).observe(run.seconds)
            self.real_tokens.labels(name).inc(run.num_real_tokens)
            self.padded_tokens.labels(name).inc(run.num_padded_tokens)
            self._real += run.num_real_tokens
            self._padded += run.num_padded_tokens
        if self._real + self._padded:
            self.padding_waste_ratio.labels(name).set(self._padded / (self._real + self._padded))
        if stats.mask_seconds is not None:
            self.structured_output_mask_seconds.labels(name).observe(stats.mask_seconds)
        if (prefix := stats.prefix_cache) is not None:
            self.prefix_cache_queries.labels(name).inc(prefix.queries)
            self.prefix_cache_hits.labels(name).inc(prefix.hits)
            self.prefix_cache_stores.labels(name).inc(prefix.stores)
            self.prefix_cache_evictions.labels(name).inc(prefix.evictions)
            self.prefix_cache_rows.labels(name).set(prefix.rows_used)
            self.prefix_cache_tokens.labels(name).set(prefix.tokens_cached)

    def observe_grammar_compile(self, kind: str, seconds: float) -> None:
        self.grammar_compile_seconds.labels(self.model_name, kind).observe(seconds)

    def observe_structured_request(self, kind: str) -> None:
        self.structured_output_requests.labels(self.model_name, kind).inc()

    def observe_engine(self, num_running: int, num_waiting: int) -> None:
        """Refresh the queue gauges from the engine itself (e.g. at scrape time, when idle)."""
        self.num_requests_running.labels(self.model_name).set(num_running)
        self.num_requests_waiting.labels(self.model_name).set(num_waiting)

    def observe_rejected(self, reason: str) -> None:
        self.num_requests_rejected.labels(self.model_name, reason).inc()

    def observe_token_gap(self, seconds: float) -> None:
        self.inter_token_latency.labels(self.model_name).observe(seconds)

    def observe_request(self, stats: RequestStats) -> None:
        name, t = self.model_name, stats.times
        self.prompt_tokens.labels(name).inc(stats.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(stats.num_generation_tokens)
        self.request_success.labels(name, stats.finish_reason.value).inc()
        self.request_prompt_tokens.labels(name).observe(stats.num_prompt_tokens)
        self.request_generation_tokens.labels(name).observe(stats.num_generation_tokens)
        if t.first_token is not None:
            self.time_to_first_token.labels(name).observe(t.first_token - t.arrival)
        if t.finished is not None:
            self.e2e_request_latency.labels(name).observe(t.finished - t.arrival)
        if t.scheduled is not None:
            self.request_queue_time.labels(name).observe(t.scheduled - t.arrival)

    def metric_names(self) -> set[str]:
        """Every sample name this registry exports (e.g. 'kiln:num_requests_waiting')."""
        return {s.name for fam in self.registry.collect() for s in fam.samples} | {
            fam.name for fam in self.registry.collect()}
