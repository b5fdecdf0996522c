"""A local OpenAI-compatible HTTP server for tests: ``http.server`` on 127.0.0.1 answering ``/v1/models``,
``/v1/completions`` (echo + prompt logprobs) and ``/v1/chat/completions`` from a ``LocalLM``. It can
inject faults (503 answers, slow answers) to test retries and timeouts.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ServerFaults:
    """Faults injected by the test server (mutable on purpose: tests change them between calls)."""

    fail_first: int = 0            # the first N requests to /v1/* POST endpoints answer 503
    delay_s: float = 0.0           # every POST request sleeps this long before answering
    hang_first: int = 0            # the first N POST requests sleep ``hang_s`` (to trigger client timeouts)
    hang_s: float = 0.0


@dataclass
class ServerStats:
    requests: int = 0
    answered_503: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class OpenAICompatServer:
    """An OpenAI-compatible server on 127.0.0.1 backed by a ``LocalLM``; use as a context manager."""

    def __init__(self, lm: Any, model_name: str = "tiny", faults: ServerFaults | None = None):
        self.lm, self.model_name = lm, model_name
        self.faults = faults or ServerFaults()
        self.stats = ServerStats()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "OpenAICompatServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, obj: Any) -> None:
                body = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                st, f = server.stats, server.faults
                with st.lock:
                    st.requests += 1
                    n = st.requests
                    st.in_flight += 1
                    st.max_in_flight = max(st.max_in_flight, st.in_flight)
                try:  # in flight = accepted and not yet answered (decremented before the reply)
                    if n <= f.hang_first:
                        time.sleep(f.hang_s)
                    if f.delay_s:
                        time.sleep(f.delay_s)
                    if n <= f.fail_first:
                        with st.lock:
                            st.answered_503 += 1
                        reply = (503, {"error": "overloaded"})
                    elif self.path == "/v1/completions":
                        reply = (200, server._completions(body))
                    elif self.path == "/v1/chat/completions":
                        reply = (200, server._chat(body))
                    else:
                        reply = (404, {"error": "not found"})
                finally:
                    with st.lock:
                        st.in_flight -= 1
                self._send(*reply)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- endpoints
    def _prompt_logprobs(self, text: str) -> dict:
        import torch

        tok, model = self.lm.tokenizer, self.lm.model
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        with self.lm._lock, torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        vals: list[float | None] = [None] + [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
        return {"tokens": tok.convert_ids_to_tokens(ids), "token_logprobs": vals,
                "text_offset": [int(o[0]) for o in enc["offset_mapping"]], "top_logprobs": None}

    def _completions(self, body: dict) -> dict:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        if not body.get("echo") or int(body.get("max_tokens", 16)) != 0:
            raise ValueError("this test server only serves echo=True, max_tokens=0")
        choices = [{"index": i, "text": p, "finish_reason": "length", "logprobs": self._prompt_logprobs(p)}
                   for i, p in enumerate(prompts)]
        return {"object": "text_completion", "model": self.model_name, "choices": choices}

    def _chat(self, body: dict) -> dict:
        msgs = body["messages"]
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        user = [m["content"] for m in msgs if m["role"] == "user"][-1]
        text = self.lm.generate([user], int(body.get("max_tokens", 16)), system=system)[0]
        return {"object": "chat.completion", "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length"}]}
