"""A small inference server on 127.0.0.1 for the served-teacher tests: it speaks vLLM's OpenAI-compatible protocol
(``GET /v1/models``; ``POST /v1/completions`` with a token-id prompt, ``prompt_logprobs`` capped at ``max_logprobs``
with vLLM's error, ``prompt_token_ids`` when ``return_token_ids``) and SGLang's native one (``GET /get_model_info``;
``POST /generate`` with ``input_ids``, ``top_logprobs_num``, ``meta_info.input_token_logprobs`` /
``input_top_logprobs``) over a transformers causal LM run on each prompt alone.

Answers follow the engines' conventions: the entry of prompt token i is the distribution of token i given the tokens
before it (none for token 0); vLLM's entry is a dict ``{"<id>": {"logprob", "rank", "decoded_token"}}`` holding the
top k and the prompt token itself; SGLang's lists ``[logprob, id, text]``. Switches reproduce what real deployments
get wrong: logits instead of log-probabilities (``--logprobs-mode raw_logits``), a BOS put before the prompt, cached
prefixes answered without log-probabilities, no token strings (``--skip-tokenizer-init``), fewer log-probabilities
than asked, failing or dropped requests, a slow answer, and the server going away (:meth:`TeacherServer.stop`).
"""

from __future__ import annotations

import copy
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class TeacherServer:
    """``with TeacherServer(model) as server: ServedTeacher(server.url, ...)``; stops (every thread joined, the port
    closed) when the block ends or at :meth:`stop`."""

    def __init__(
        self,
        model,
        *,
        name: str = "tiny-teacher",
        tokenizer=None,
        max_logprobs: int = 20,
        max_model_len: int | None = None,
        logits_mode: bool = False,
        prepend: int | None = None,
        cached_prefix: int = 0,
        echo_token_ids: bool = True,
        returns_at_most: int | None = None,
    ):
        self.model = copy.deepcopy(model).eval()  # the tests' own copy stays untouched by the server's threads
        self.name, self.tokenizer, self.max_logprobs = name, tokenizer, max_logprobs
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.logits_mode, self.prepend, self.cached_prefix = logits_mode, prepend, cached_prefix
        self.echo_token_ids = echo_token_ids
        self.returns_at_most = returns_at_most  # an engine that silently returns fewer than asked
        self.failures: list[int | str] = []  # answers for the next scoring requests: an HTTP status, or "drop"
        self.slow = False  # scoring requests wait until the test (or stop) releases them
        self.barrier: threading.Barrier | None = None  # the first scoring requests wait here for each other
        self.scored: list[list[int]] = []  # the prompts of the scoring requests answered
        self.payloads: list[dict] = []
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> TeacherServer:
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = False  # server_close() joins every handler thread: nothing outlives a test
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """The server goes away: waiting requests are released, the port closes, every thread is joined."""
        if self._server is None or self._thread is None:
            return
        self._release.set()
        if self.barrier is not None:
            self.barrier.abort()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._thread = None

    # ---- what the model answers ------------------------------------------------------------------------------

    def log_probabilities(self, ids: list[int]) -> torch.Tensor:
        """(n × V) log-probabilities of the token after each prompt position (logits in ``logits_mode``)."""
        with self._lock, torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        return logits if self.logits_mode else logits.log_softmax(-1)

    def text(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.convert_ids_to_tokens(token)

    def scored_positions(self, ids: list[int], k: int):
        """For prompt tokens 1..n−1: ``(top ids, top values, the prompt token's value, its rank)``; ``None`` for the
        tokens a prefix cache answers (the first ``cached_prefix``)."""
        values = self.log_probabilities(ids)
        positions = [None]
        for index in range(1, len(ids)):
            if index < self.cached_prefix:
                positions.append(None)
                continue
            row = values[index - 1]
            top = row.topk(min(k, self.returns_at_most or k))
            token_value = float(row[ids[index]])
            rank = int((row > row[ids[index]]).sum()) + 1
            positions.append((top.indices.tolist(), top.values.tolist(), token_value, rank))
        return positions


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that gave up (a timeout) before its answer was written is expected here, not a failure."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def _handler(server: TeacherServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "BadRequestError") -> None:
            self._reply(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

        def do_GET(self):
            if self.path == "/v1/models":
                entry = {"id": server.name, "object": "model", "max_model_len": server.max_model_len}
                return self._reply(200, {"object": "list", "data": [entry]})
            if self.path == "/get_model_info":
                return self._reply(200, {"model_path": server.name, "is_generation": True})
            self._error(404, f"no route {self.path}", "NotFoundError")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.path not in ("/v1/completions", "/generate"):
                return self._error(404, f"no route {self.path}", "NotFoundError")
            if server.barrier is not None:
                try:
                    server.barrier.wait()
                except threading.BrokenBarrierError:
                    return self._error(500, "the other requests of the batch never came", "InternalServerError")
            if server.slow:
                server._release.wait(timeout=60)
            with server._lock:
                failure = server.failures.pop(0) if server.failures else None
                server.payloads.append(body)
            if failure == "drop":  # the connection closes without an answer
                self.close_connection = True
                return
            if failure is not None:
                return self._error(failure, "the engine is overloaded", "ServiceUnavailableError")
            if self.path == "/v1/completions":
                return self._completions(body)
            return self._generate(body)

        def _completions(self, body: dict) -> None:
            if body.get("model") != server.name:
                return self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            k, ids = body.get("prompt_logprobs"), list(body["prompt"])
            if k is not None and k > server.max_logprobs:
                return self._error(
                    400, f"Requested prompt logprobs of {k}, which is greater than max allowed: {server.max_logprobs}"
                )
            if server.prepend is not None:
                ids = [server.prepend, *ids]
            if len(ids) + body.get("max_tokens", 16) > server.max_model_len:
                return self._error(400, f"This model's maximum context length is {server.max_model_len} tokens.")
            choice = {"index": 0, "text": "", "finish_reason": "length"}
            if k is not None:
                choice["prompt_logprobs"] = [
                    None if position is None else _vllm_entry(server, position, ids[index])
                    for index, position in enumerate(server.scored_positions(ids, k))
                ]
            if body.get("return_token_ids") and server.echo_token_ids:
                choice["prompt_token_ids"] = ids
            with server._lock:
                server.scored.append(ids)
            usage = {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
            self._reply(
                200,
                {
                    "id": "cmpl-test",
                    "object": "text_completion",
                    "model": server.name,
                    "choices": [choice],
                    "usage": usage,
                },
            )

        def _generate(self, body: dict) -> None:
            ids, k = list(body["input_ids"]), body.get("top_logprobs_num", 0)
            if server.prepend is not None:
                ids = [server.prepend, *ids]
            text = server.text if body.get("return_text_in_logprobs") else (lambda token: None)
            tokens, tops = [[None, ids[0], text(ids[0])]], [None]
            for index, position in enumerate(server.scored_positions(ids, k)[1:], start=1):
                if position is None:
                    tokens.append([None, ids[index], text(ids[index])])
                    tops.append(None)
                    continue
                top_ids, top_values, token_value, _ = position
                tokens.append([token_value, ids[index], text(ids[index])])
                tops.append([[value, token, text(token)] for token, value in zip(top_ids, top_values)])
            with server._lock:
                server.scored.append(ids)
            meta = {"input_token_logprobs": tokens, "input_top_logprobs": tops, "prompt_tokens": len(ids)}
            self._reply(200, {"text": "", "output_ids": [0], "meta_info": meta})

    return Handler


def _vllm_entry(server: TeacherServer, position, token: int) -> dict:
    """vLLM's dict for one prompt position: the top k and the prompt token itself (k + 1 entries when it is not
    among them), keyed by the id as a string."""
    top_ids, top_values, token_value, rank = position
    entry = {str(token): {"logprob": token_value, "rank": rank, "decoded_token": server.text(token)}}  # first, as vLLM
    for place, (candidate, value) in enumerate(zip(top_ids, top_values)):
        entry[str(candidate)] = {"logprob": value, "rank": place + 1, "decoded_token": server.text(candidate)}
    return entry
