"""Teacher behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM serve,
SGLang, DeepSeek's API, …), over aiohttp.

One request per (prompt, sample) with ``n=1`` and a per-sample ``seed``: every server
supports it, and a sample does not depend on batching.  Concurrency is bounded by a
semaphore; 429 / 5xx / timeouts / dropped connections are retried with exponential
backoff (``Retry-After`` honoured).  The API key is read from the environment variable
named in the config, sent only in the ``Authorization`` header, and scrubbed from any
error text; it is never logged or stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any, Sequence

from ..errors import DataError
from engines.types import prompt_seed

from .base import Completion, Messages, SamplingSettings

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def chat_completions_url(api_base: str) -> str:
    base = api_base.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


class _Retryable(Exception):
    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.retry_after = retry_after


class OpenAITeacher:
    def __init__(self, api_base: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 max_concurrency: int = 8, max_retries: int = 5, request_timeout: float = 600.0,
                 backoff_base: float = 0.5, backoff_max: float = 30.0):
        if not api_base:
            raise DataError("backend 'openai' needs api_base, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise DataError("backend 'openai' needs model_name_or_path (the served model's name)")
        self.url = chat_completions_url(api_base)
        self.model = model
        self.name = f"openai:{model}@{api_base.rstrip('/')}"
        self._key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and api_key_env != "OPENAI_API_KEY" and not self._key:
            raise DataError(f"backend 'openai': environment variable {api_key_env} (api_key_env) is not set")
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_retries = max(0, int(max_retries))
        self.request_timeout = float(request_timeout)
        self.backoff_base, self.backoff_max = backoff_base, backoff_max

    def __repr__(self) -> str:  # never show the key
        return f"OpenAITeacher(url={self.url!r}, model={self.model!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def generate(self, prompts: Sequence[Messages], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        if not prompts:
            return []
        return asyncio.run(self._generate(prompts, n, sampling))

    async def _generate(self, prompts: Sequence[Messages], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        import aiohttp

        sem = asyncio.Semaphore(self.max_concurrency)
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        connector = aiohttp.TCPConnector(limit=self.max_concurrency)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
            tasks = [self._request(session, sem, p, i, sampling) for p in prompts for i in range(n)]
            flat = await asyncio.gather(*tasks)
        return [flat[k * n:(k + 1) * n] for k in range(len(prompts))]

    async def _request(self, session: Any, sem: asyncio.Semaphore, prompt: Messages, index: int,
                       sampling: SamplingSettings) -> Completion:
        body = {"model": self.model, "messages": prompt, "n": 1, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}
        if sampling.seed is not None:
            body["seed"] = prompt_seed(sampling.seed, prompt, index)
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                async with sem:
                    return await self._post(session, body)
            except _Retryable as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                delay = min(self.backoff_max, self.backoff_base * 2 ** attempt) * (1 + 0.25 * random.random())
                if e.retry_after is not None:
                    delay = min(max(delay, e.retry_after), 60.0)
                log.warning("%s: %s; retry %d/%d in %.1fs", self.url, last, attempt + 1, self.max_retries, delay)
                await asyncio.sleep(delay)
        raise DataError(f"OpenAI-compatible endpoint {self.url} failed after {self.max_retries + 1} "
                        f"attempt(s): {last}")

    async def _post(self, session: Any, body: dict[str, Any]) -> Completion:
        import aiohttp

        try:
            async with session.post(self.url, json=body) as resp:
                text = await resp.text()
                if resp.status in RETRY_STATUS:
                    ra = resp.headers.get("Retry-After")
                    raise _Retryable(f"HTTP {resp.status}", float(ra) if ra and ra.replace(".", "", 1).isdigit() else None)
                if resp.status != 200:
                    raise DataError(f"OpenAI-compatible endpoint {self.url} returned HTTP {resp.status}: "
                                    f"{self._scrub(text[:300])}")
        except aiohttp.ClientConnectorError as e:
            raise _Retryable(f"cannot reach the endpoint ({self._scrub(str(e.os_error))})") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise _Retryable(f"connection error ({type(e).__name__}: {self._scrub(str(e))})") from None
        except asyncio.TimeoutError:
            raise _Retryable(f"timed out after {self.request_timeout:g}s") from None
        return self._parse(text)

    def _parse(self, text: str) -> Completion:
        import json

        try:
            data = json.loads(text)
            choice = data["choices"][0]
            msg = choice["message"]
            content = msg.get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise DataError(f"{self.url}: response is not a chat completion: {self._scrub(text[:300])}") from None
        # Reasoning servers (DeepSeek's API, vLLM with a reasoning parser) return the chain of
        # thought separately; put it back in R1's <think> format.
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if reasoning and "<think>" not in content:
            content = f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"
        usage = data.get("usage") or {}
        return Completion(text=content, completion_tokens=usage.get("completion_tokens"),
                          prompt_tokens=usage.get("prompt_tokens"), finish_reason=choice.get("finish_reason"))

    def close(self) -> None:
        pass
