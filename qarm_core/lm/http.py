"""An OpenAI-compatible server (vLLM, TGI) as a language-model backend: parallel requests, a total
deadline per request, retries with backoff.

Safety: the bearer token comes only from the environment (``api_key_env``) and goes only to the
configured origin: redirects are not followed (a 3xx answer is an error naming where it pointed),
so a token is never forwarded to another host; a URL carrying credentials is refused by the config
(``HttpConfig``). ``timeout_s`` bounds the whole request (connect, send, headers and body): a server
that trickles its answer a byte at a time is cut off at the deadline, not kept alive by each byte.
"""

from __future__ import annotations

import contextvars
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from qarm_core.lm.backend import BackendError
from qarm_core.errors import raise_if_stopped
from qarm_core.lm.config import HttpConfig
from qarm_core.progress import Progress, advance

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment (what may be printed or logged): the one
    redactor, ``qarm_core.config.redact_uri``."""
    from qarm_core.config import redact_uri

    return redact_uri(url)


class HttpLM:
    """An OpenAI-compatible server (vLLM, TGI).

    Scoring uses ``/v1/completions`` with ``echo=true, logprobs=1, max_tokens=0``: the server returns
    the prompt's own token log-probabilities with their character offsets, and the tokens starting
    at or after ``len(context)`` are the continuation's. Requests carry ``prompts_per_request``
    prompts each and run ``concurrency`` at a time; a timeout, a connection error or a
    408/429/5xx answer is retried ``max_retries`` times with exponential backoff.
    """

    def __init__(self, cfg: HttpConfig | None = None, model_id: str | None = None):
        self.cfg = cfg or HttpConfig()
        self.base = self.cfg.url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        u = urllib.parse.urlsplit(self.base)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise BackendError(f"judge/QA server URL must be http(s)://host[:port][/path], got {redact_url(self.base)!r}")
        self._https, self._host, self._port, self._path = u.scheme == "https", u.hostname, u.port, u.path
        self._model = self.cfg.model
        self.requests_sent = 0
        self._count_lock = threading.Lock()
        self._model_id = model_id

    @property
    def model_id(self) -> str:
        """``http:<server model name>`` (asks ``/v1/models`` when no model name is configured)."""
        return self._model_id or f"http:{self.model_name}"

    @property
    def model_name(self) -> str:
        if self._model is None:
            models = self._request("GET", "/v1/models", None)
            try:
                self._model = models["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise BackendError(f"{self.base}/v1/models lists no model: {str(models)[:200]}") from None
        return self._model

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                raise BackendError(f"environment variable {self.cfg.api_key_env} (judge API key) is not set")
            h["Authorization"] = f"Bearer {key}"
        return h

    def _once(self, method: str, path: str, data: bytes | None) -> tuple[int, dict[str, str], bytes]:
        """One request, within ``timeout_s`` in total: (status, headers, body). A watchdog shuts the
        socket down at the deadline, which ends any blocked read; that is reported as a timeout."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.cfg.timeout_s)
        expired = threading.Event()
        opened: list = []                  # the socket: the connection lets go of it once the answer
                                           # is to be read until the server closes

        def cut() -> None:
            expired.set()
            for sock in opened:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.cfg.timeout_s, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            opened.append(conn.sock)
            if expired.is_set():
                raise TimeoutError
            conn.request(method, self._path + path, body=data, headers=self._headers())
            resp = conn.getresponse()
            body = resp.read()
            if expired.is_set():
                raise TimeoutError
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError from None
            raise
        finally:
            watchdog.cancel()
            conn.close()

    def _request(self, method: str, path: str, body: dict | None) -> Any:
        url = redact_url(self.base) + path
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            raise_if_stopped()                  # no new attempt after a stop
            with self._count_lock:
                self.requests_sent += 1
            try:
                status, headers, raw = self._once(method, path, data)
            except TimeoutError:
                last = f"timed out: no complete answer within the {self.cfg.timeout_s}s deadline"
                continue
            except (OSError, http.client.HTTPException) as exc:
                last = f"connection failed: {type(exc).__name__}: {exc}"
                continue
            if 300 <= status < 400:
                # never followed: the request carries the bearer token, which must not reach
                # whatever origin the server points at
                raise BackendError(f"{method} {url} -> HTTP {status} redirect to "
                                   f"{redact_url(headers.get('location', '?'))!r}: redirects are not followed; "
                                   "configure the final URL")
            if status >= 400:
                detail = raw.decode(errors="replace")[:300]
                if status not in _RETRY_STATUS:
                    raise BackendError(f"{method} {url} -> HTTP {status}: {detail}")
                last = f"HTTP {status}: {detail}"
                continue
            try:
                return json.loads(raw.decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                last = f"{type(exc).__name__}: {exc}"
        raise BackendError(f"{method} {url} failed after {self.cfg.max_retries + 1} attempt(s); last: {last}")

    def _map(self, fn, chunks: list, progress: Progress | None = None) -> list:
        """``[fn(c) for c in chunks]``, ``concurrency`` at a time, in order; ``progress`` advances
        by ``len(c)`` as each chunk's answer arrives."""
        def run(c):
            raise_if_stopped()          # queued requests are not sent after a stop (nor retried: _request)
            r = fn(c)
            advance(progress, len(c) if isinstance(c, list) else 1)
            return r

        if len(chunks) <= 1 or self.cfg.concurrency == 1:
            return [run(c) for c in chunks]
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        try:
            # each request runs in a copy of the caller's context, so what it logs (progress)
            # still belongs to the caller's Prefect task run
            futures = [pool.submit(contextvars.copy_context().run, run, c) for c in chunks]
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)   # a failure or a stop: drop what is queued
            raise
        finally:
            pool.shutdown(wait=True)

    def continuation_logprobs(self, contexts: Sequence[str], continuations: Sequence[str],
                              prefix: str = "", progress: Progress | None = None) -> list[np.ndarray]:
        """Per-token log P(continuation | prefix + context) from the server's prompt logprobs
        (a shared ``prefix`` is what vLLM's automatic prefix caching reuses)."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        items = [(prefix + c, x) for c, x in zip(contexts, continuations)]
        n = self.cfg.prompts_per_request
        chunks = [items[s:s + n] for s in range(0, len(items), n)]
        model = self.model_name

        def score(chunk: list[tuple[str, str]]) -> list[np.ndarray]:
            body = {"model": model, "prompt": [c + x for c, x in chunk], "max_tokens": 0,
                    "echo": True, "logprobs": 1, "temperature": 0.0}
            resp = self._request("POST", "/v1/completions", body)
            choices = sorted(resp.get("choices") or [], key=lambda ch: ch.get("index", 0))
            if len(choices) != len(chunk):
                raise BackendError(f"/v1/completions returned {len(choices)} choices for {len(chunk)} prompts")
            res = []
            for (c, x), ch in zip(chunk, choices):
                lp = ch.get("logprobs") or {}
                offs, vals = lp.get("text_offset"), lp.get("token_logprobs")
                if offs is None or vals is None:
                    raise BackendError("/v1/completions returned no prompt logprobs (echo + logprobs "
                                       "unsupported by this server?)")
                end = len(c) + len(x)
                got = [v for o, v in zip(offs, vals) if len(c) <= o < end]
                if not got or any(v is None for v in got):
                    raise BackendError(f"no logprobs for the continuation {x[:40]!r}")
                res.append(np.asarray(got, dtype=np.float64))
            return res

        return [a for part in self._map(score, chunks, progress) for a in part]

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int | None = None,
                 system: str | None = None, progress: Progress | None = None) -> list[str]:
        """Greedy ``/v1/chat/completions``, one request per prompt, ``concurrency`` at a time."""
        model = self.model_name

        def one(p: str) -> str:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            resp = self._request("POST", "/v1/chat/completions",
                                 {"model": model, "messages": msgs, "max_tokens": max_new_tokens,
                                  "temperature": 0.0})
            try:
                return (resp["choices"][0]["message"]["content"] or "").strip()
            except (KeyError, IndexError, TypeError):
                raise BackendError(f"unexpected chat completion: {str(resp)[:200]}") from None

        return self._map(one, list(prompts), progress)
