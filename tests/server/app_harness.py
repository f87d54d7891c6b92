"""Harness: the app in-process around FakeEngine, with the official openai client on Starlette's TestClient."""
from __future__ import annotations

import openai
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.serving import ModelInfo
from server.metrics import Metrics
from server_fakes import FakeEngine
from server_harness import wait_until

MODEL = "fake-model"
MAX_MODEL_LEN = 64


class Harness:
    def __init__(self, tokenizer, max_model_len: int = MAX_MODEL_LEN, **app_kwargs):
        self.tokenizer = tokenizer
        self.engine = FakeEngine(tokenizer)
        self.metrics = Metrics(MODEL)
        info = ModelInfo(name=MODEL, max_model_len=max_model_len, vocab_size=len(tokenizer))
        self.app = create_app(self.engine, tokenizer, info, self.metrics, **app_kwargs)
        self.http = TestClient(self.app, raise_server_exceptions=False)
        self.http.__enter__()
        assert wait_until(lambda: self.http.get("/ready").status_code == 200, timeout=5)
        self.api_key = app_kwargs.get("api_key") or "unused"
        self.client = openai.OpenAI(base_url="http://testserver/v1", api_key=self.api_key,
                                    http_client=self.http, max_retries=0)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def close(self) -> None:
        self.http.__exit__(None, None, None)
