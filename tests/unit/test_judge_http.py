"""The HTTP judge backend against a real OpenAI-compatible server on 127.0.0.1 (a real socket),
which computes prompt logprobs with a real tiny transformers model."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pyarrow as pa
import pytest

from qarm_core.judge.config import JudgeConfig
from qarm_core.judge.judge import PairScorer, judge_pairs
from qarm_core.judge.prompts import judge_prompt
from qarm_core.lm.backend import BackendError
from qarm_core.lm.config import HttpConfig
from qarm_core.lm.http import HttpLM
from qarm_core.schemas import JUDGMENTS
from tests.support.openai_server import OpenAICompatServer, ServerFaults

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CTXS = ['A movie fan loved "Heat (1995)". Another movie this fan loved:', "Question: what year?",
        'A movie fan loved "Babe". Another movie this fan loved:']
CONTS = [' "Star Wars (1977), genres: Sci-Fi"', " It was 1995.", ' "Toy Story (1995)"']




def _http(url: str, **kw) -> HttpLM:
    base = dict(url=url, timeout_s=5.0, concurrency=2, max_retries=2, backoff_s=0.0, prompts_per_request=2)
    return HttpLM(HttpConfig(**{**base, **kw}))


def test_prompt_logprobs_over_http_equal_local(tiny_lm):
    with OpenAICompatServer(tiny_lm) as srv:
        http = _http(srv.url)
        assert http.model_id == "http:tiny"          # name taken from /v1/models
        got = http.continuation_logprobs(CTXS, CONTS)
        got_pre = http.continuation_logprobs(CTXS, CONTS, prefix="Star Wars (1977).\n")
    want = tiny_lm.continuation_logprobs(CTXS, CONTS)
    want_pre = tiny_lm.continuation_logprobs(CTXS, CONTS, prefix="Star Wars (1977).\n")
    for g, w in zip(got + got_pre, want + want_pre):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_requests_run_concurrently(tiny_lm):
    with OpenAICompatServer(tiny_lm, faults=ServerFaults(delay_s=0.4)) as srv:
        http = _http(srv.url, concurrency=4, prompts_per_request=1, model="tiny")
        t0 = time.perf_counter()
        out = http.continuation_logprobs(CTXS * 4, CONTS * 4)     # 12 requests
        wall = time.perf_counter() - t0
    assert len(out) == 12
    assert srv.stats.max_in_flight == 4
    assert wall < 12 * 0.4 / 2          # serial would take >= 4.8 s


def test_retries_after_503(tiny_lm):
    with OpenAICompatServer(tiny_lm, faults=ServerFaults(fail_first=2)) as srv:
        http = _http(srv.url, concurrency=1, prompts_per_request=8, model="tiny")
        out = http.continuation_logprobs(CTXS, CONTS)
    assert len(out) == 3 and srv.stats.answered_503 == 2 and http.requests_sent == 3
    with OpenAICompatServer(tiny_lm, faults=ServerFaults(fail_first=10)) as srv:
        http = _http(srv.url, concurrency=1, prompts_per_request=8, model="tiny", max_retries=1)
        with pytest.raises(BackendError, match="HTTP 503"):
            http.continuation_logprobs(CTXS, CONTS)
        assert http.requests_sent == 2


def test_timeout_is_retried_then_fails(tiny_lm):
    faults = ServerFaults(hang_first=1, hang_s=1.5)
    with OpenAICompatServer(tiny_lm, faults=faults) as srv:
        http = _http(srv.url, timeout_s=0.4, concurrency=1, prompts_per_request=8, model="tiny")
        t0 = time.perf_counter()
        assert len(http.continuation_logprobs(CTXS, CONTS)) == 3
        assert time.perf_counter() - t0 < 1.4 and http.requests_sent == 2
        faults.hang_first, faults.hang_s = 10**6, 1.0
        http = _http(srv.url, timeout_s=0.3, max_retries=1, concurrency=1, prompts_per_request=8, model="tiny")
        with pytest.raises(BackendError, match="timed out"):
            http.continuation_logprobs(CTXS, CONTS)


def test_client_errors_are_not_retried_and_dead_servers_fail_clearly(tiny_lm):
    with OpenAICompatServer(tiny_lm) as srv:
        http = _http(srv.url + "/nope", model="tiny", prompts_per_request=8)
        with pytest.raises(BackendError, match="HTTP 404"):
            http.continuation_logprobs(CTXS, CONTS)
        assert http.requests_sent == 1
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                          # nothing listens there now
    http = _http(f"http://127.0.0.1:{port}", model="tiny", max_retries=1)
    with pytest.raises(BackendError, match="connection failed"):
        http.continuation_logprobs(CTXS, CONTS)


def test_judge_over_http_matches_local(tiny_lm):
    items = pa.table({"item_id": pa.array([1, 2, 3, 4], pa.int64()),
                      "title": ["Toy Story", "Heat", "Star Wars", "Babe"],
                      "year": pa.array([1995, 1995, 1977, 1995], pa.int32()),
                      "tags": [["Comedy"], ["Action"], ["Sci-Fi"], ["Drama"]]})
    pairs = pa.table({"src_item": pa.array([1, 1, 3, 2], pa.int64()), "dst_item": pa.array([2, 3, 4, 1], pa.int64()),
                      "source": ["swing", "swing", "u2i", "u2i"]})
    cfg = JudgeConfig(embed_weight=0.0, reasoning="sample", reasoning_sample=2, reasoning_max_tokens=4)
    local = judge_pairs(pairs, items, cfg, scorer=PairScorer(tiny_lm, judge_prompt(JudgeConfig().prompt_version)))
    with OpenAICompatServer(tiny_lm) as srv:
        http = _http(srv.url)
        remote = judge_pairs(pairs, items, cfg, scorer=PairScorer(http, judge_prompt(JudgeConfig().prompt_version)))
    assert remote.schema == JUDGMENTS.schema
    np.testing.assert_allclose(remote["score"].to_numpy(), local["score"].to_numpy(), atol=1e-3)
    assert remote["keep"].to_pylist() == local["keep"].to_pylist()
    assert set(remote["model_id"].to_pylist()) == {"http:tiny"}
    assert srv.stats.requests >= 3          # scoring + neutral + chat generations


class _Recorder:
    """A bare HTTP server on 127.0.0.1 whose GET handler is ``answer(handler)``; records each
    request's path and headers."""

    def __init__(self, answer):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                seen.append((self.path, dict(self.headers)))
                answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_redirects_are_refused_and_the_token_stays_home(monkeypatch):
    monkeypatch.setenv("QARM_TEST_KEY", "s3cret-token")
    other = _Recorder(lambda h: (h.send_response(200), h.end_headers(), h.wfile.write(b'{"data": []}')))

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", other.url + "/v1/models?k=1")
        h.send_header("Content-Length", "0")
        h.end_headers()

    home = _Recorder(redirect)
    try:
        http = _http(home.url, api_key_env="QARM_TEST_KEY", max_retries=2)
        with pytest.raises(BackendError, match="HTTP 302 redirect to .*redirects are not followed") as err:
            http.model_name
        assert "s3cret" not in str(err.value) and "k=1" not in str(err.value)
        # the configured origin got the token once (a redirect is not retried); the other none at all
        assert [h.get("Authorization") for _, h in home.seen] == ["Bearer s3cret-token"]
        assert other.seen == []
    finally:
        home.close()
        other.close()


def test_the_deadline_bounds_a_trickling_answer():
    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        try:
            for _ in range(1000):          # one byte every 50 ms: 50 s for the whole body
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass                            # the client hung up at its deadline

    srv = _Recorder(trickle)
    try:
        http = _http(srv.url, timeout_s=1.0, max_retries=1)
        t0 = time.perf_counter()
        with pytest.raises(BackendError, match="timed out: no complete answer within the 1.0s deadline"):
            http.model_name
        assert time.perf_counter() - t0 < 3.5 and len(srv.seen) == 2     # two attempts of ~1 s each
    finally:
        srv.close()


@pytest.mark.parametrize("url, why", [("http://user:pw-secret@127.0.0.1:8000", "credentials"),
                                      ("http://127.0.0.1:8000/?api_key=pw-secret", "query"),
                                      ("http://127.0.0.1:99999", "not a URL")])
def test_urls_with_secrets_are_refused_without_echoing_them(url, why):
    from qarm_core.config import parse_config
    from qarm_core.errors import ConfigError

    with pytest.raises(ConfigError, match=why) as err:
        parse_config({"judge": {"backend": "http", "http": {"url": url}}})
    assert "pw-secret" not in str(err.value)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_stop_leaves_the_queued_requests_unsent(concurrency):
    """Once a stop is recorded, no further request goes out; the requests in flight finish."""
    import signal
    import threading

    from qarm_core.errors import Stopped, forget_stops, note_stop

    http = HttpLM(HttpConfig(url="http://127.0.0.1:9", concurrency=concurrency), model_id="http:none")
    sent = []
    stopped = threading.Event()

    def request(chunk):
        if chunk == 0:
            note_stop(signal.SIGTERM)
            stopped.set()
        else:
            stopped.wait(10)            # a request already in flight when the stop came
        sent.append(chunk)
        return chunk

    try:
        with pytest.raises(Stopped):
            http._map(request, list(range(20)))
    finally:
        forget_stops()
    assert 0 in sent and set(sent) <= set(range(concurrency))
    assert http._map(request, [1, 2, 3]) == [1, 2, 3]       # the next command's requests run


def test_a_stop_ends_the_retries_of_a_request(monkeypatch):
    """A request that timed out is not tried again after a stop (each attempt may wait timeout_s)."""
    import signal

    from qarm_core.errors import Stopped, forget_stops, note_stop

    http = HttpLM(HttpConfig(url="http://127.0.0.1:9", max_retries=3, backoff_s=0.0), model_id="http:none")

    def times_out(method, path, data):
        note_stop(signal.SIGTERM)       # the stop arrives while the first attempt waits
        raise TimeoutError

    monkeypatch.setattr(http, "_once", times_out)
    try:
        with pytest.raises(Stopped):
            http._request("POST", "/v1/completions", {})
    finally:
        forget_stops()
    assert http.requests_sent == 1
