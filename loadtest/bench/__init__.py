"""Serving benchmark for OpenAI-compatible servers (the measures of `vllm bench serve`).

Run `python -m loadtest.bench --help`; see loadtest/README.md.
"""
