"""A teacher served by an inference engine: the top-k log-probabilities of every token of a batch, asked of a vLLM
server (its OpenAI-compatible ``/v1/completions`` with a token-id prompt and ``prompt_logprobs``) or of an SGLang
server (its native ``/generate`` with ``input_ids`` and ``top_logprobs_num``), one request per row, several rows at
once. The answer becomes the sparse distribution a top-k teacher cache holds (the k entries plus the remaining
mass spread over the others, :func:`~hf_kd.teachers.precomputed.sparse_rows`), so the losses read it as they read a
cache, and :func:`~hf_kd.cache.write_teacher_cache` writes a cache from it.

Alignment: both engines report, for prompt token i, the distribution of token i given the tokens before it (nothing
for token 0). A causal LM's logits at position t predict token t + 1, so position t of the batch gets the engine's
entry for token t + 1; the last attended position predicts past the row and holds the uniform distribution, as
positions that no loss reads do.
"""

from __future__ import annotations

import contextlib
import math
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import requests
import torch
from transformers.utils import logging

from ..checkpoints import last_complete_checkpoint
from ..features import ModelFeatures, SparseDistribution
from ..model_kinds import is_causal_lm, is_token_level, output_size
from .base import TeacherSource
from .precomputed import sparse_batch, sparse_rows

logger = logging.get_logger(__name__)

ENGINES = ("vllm", "sglang")
# Answers worth trying again: the server is starting, overloaded or restarting behind a proxy. Any other 4xx is a
# request the server will refuse every time.
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
PROBE_LENGTH = 64  # prompt tokens of the probe request (ids spread over the tokenizer's vocabulary)
LOGPROB_TOLERANCE = 1e-3  # the top-k probabilities of one position may sum above 1 by this much (rounding)
# Flags named in errors, per engine: the cap on k, the prefix cache that leaves prompt positions out, how to serve.
_CAP_FLAG = {"vllm": "--max-logprobs", "sglang": "the server's limit on top_logprobs_num"}
_PREFIX_CACHE_FLAG = {"vllm": "--no-enable-prefix-caching", "sglang": "--disable-radix-cache"}


class TeacherServerError(RuntimeError):
    """The teacher's server did not answer a request after every retry (gone, timing out, failing) or refused it:
    the message says where (the training step, or the cache's examples), the URL and the server's last words."""


class _Refused(Exception):
    """An HTTP error the server will give every time (a 4xx other than 408/429): not retried."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass
class _Answer:
    """One row's answer: for prompt tokens 1..n−1, the top-k ids (most likely first) and their log-probabilities,
    and the engine's string for every token id it named (``None`` when it sends none)."""

    ids: list[list[int]]
    logprobs: list[list[float]]
    strings: dict[int, str | None]


class ServedTeacher(TeacherSource):
    """A causal-LM teacher answered by an inference engine over HTTP: its top-k log-probabilities at every position
    of the batch, as a top-k cache would hold them. Pass it as ``teacher_model=`` to
    :class:`~hf_kd.DistillationTrainer` (logit losses), or to :func:`~hf_kd.cache.write_teacher_cache`.

    The constructor asks the server which model it serves and sends one probe request, so a wrong URL, a ``top_k``
    above the server's cap (vLLM's ``--max-logprobs``, 20 by default), an engine without prompt log-probabilities,
    logits in place of log-probabilities (vLLM's ``--logprobs-mode raw_logits``) or another tokenizer fail here,
    not at the first step. Each row of a batch is one request (its attended tokens; padding is not sent), up to
    ``max_concurrency`` at once; a request that fails to connect, times out or gets HTTP 408/429/5xx is tried again
    after ``backoff``·2ⁿ seconds, ``retries`` times, then training stops with a :class:`TeacherServerError` naming
    the step, the URL, the server's message and the checkpoint to resume from.

    Temperature: the log-probabilities must be the model's own (temperature 1). vLLM computes prompt
    log-probabilities from the raw logits whatever the request's sampling settings; requests say temperature 1 and
    top-p 1 for engines that would apply them. The losses soften the served top-k by their temperature, as they
    soften a cache's.

    Args:
        url: The server's address, e.g. ``"http://gpu-host:8000"`` (a trailing ``/v1`` is accepted).
        top_k: Log-probabilities kept per position (the cache's k); at most the server's cap.
        model: The served model's name (vLLM's ``--served-model-name``, by default its path); ``None``: the one
            model the server lists. SGLang serves one model and takes no name.
        engine: ``"vllm"`` (``/v1/completions`` + ``prompt_logprobs``) or ``"sglang"`` (``/generate``).
        vocab_size: The teacher's vocabulary size V (the tail mass is spread over V − k entries); ``None``: the
            student's, taken by the trainer (required when writing a cache).
        tokenizer: The tokenizer the batches were made with: the engine's strings for the token ids it reports are
            compared with this tokenizer's (``None``: the trainer's ``processing_class``, or the one passed to
            ``write_teacher_cache``).
        check_tokenizer: Refuse to run without that comparison when the engine reports no token strings (a server
            started with ``--skip-tokenizer-init``); ``False`` trusts the vocabularies to match.
        timeout: Seconds to wait for each answer (and each connection).
        retries: Further tries of a request that fails to connect, times out or gets HTTP 408/429/5xx.
        backoff: Seconds before the first retry, doubled before each next one.
        max_concurrency: Requests in flight at once (rows of one batch).
        temperature: Must be 1: the served log-probabilities are the model's own (see above).
        parameters: The served model's parameter count, for summaries and model cards (``None``: unknown).
        api_key: Sent as ``Authorization: Bearer <api_key>`` (a vLLM started with ``--api-key``).

    Raises:
        ValueError: An argument out of range, or the probe shows a set-up the teacher cannot serve (top_k above the
            cap, an unknown model, no prompt log-probabilities, logits, another tokenizer).
        TeacherServerError: The server does not answer the probe.
    """

    provides = frozenset({"logits"})
    covers_eval = True  # any text can be sent: evaluation data and the student's own samples (on-policy) too

    def __init__(
        self,
        url: str,
        *,
        top_k: int = 20,
        model: str | None = None,
        engine: str = "vllm",
        vocab_size: int | None = None,
        tokenizer=None,
        check_tokenizer: bool = True,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 16,
        temperature: float = 1.0,
        parameters: int | None = None,
        api_key: str | None = None,
    ):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be the server's http:// or https:// address, got {url!r}.")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive number of log-probabilities per position, got {top_k!r}.")
        if vocab_size is not None and top_k > vocab_size:
            raise ValueError(f"top_k={top_k} exceeds the teacher's vocabulary of {vocab_size} entries.")
        if temperature != 1.0:
            raise ValueError(
                f"temperature={temperature}: a served teacher's log-probabilities are the model's own (vLLM computes "
                "prompt log-probabilities from the raw logits whatever the request's temperature), so another "
                "temperature cannot be honoured. Soften the teacher with the losses' temperature "
                "(DistillationConfig.temperature), which applies to the served top-k as to a cache's."
            )
        if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}.")
        if not isinstance(backoff, (int, float)) or not math.isfinite(backoff) or backoff < 0:
            raise ValueError(f"backoff must be a finite number of seconds >= 0, got {backoff!r}.")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {retries!r}.")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a whole number >= 1, got {max_concurrency!r}.")
        self.url = re.sub(r"/(v1/?)?$", "", url.rstrip("/"))
        self.engine, self.top_k, self.vocab_size = engine, top_k, vocab_size
        self.timeout, self.retries, self.backoff, self.max_concurrency = timeout, retries, backoff, max_concurrency
        self.parameters = parameters
        self.check_tokenizer = check_tokenizer
        self.model = None  # no network in memory
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._sessions: queue.SimpleQueue[requests.Session] = queue.SimpleQueue()
        self._abort = threading.Event()  # set when a row of the batch failed: the others stop retrying
        self._context: Callable[[], tuple[str, str]] = lambda: ("a request", "")
        self._trainer: Callable[[], object] = lambda: None  # the attached trainer (a weak reference)
        self.tokenizer = None
        self._strings: dict[int, set[str]] = {}  # token id → this tokenizer's strings for it (checked ids)
        self._warned_unchecked = False
        self.model_name, self.max_model_len = self._discover(model)
        with self.during("the probe request at construction", ""):
            if tokenizer is not None:
                self.compare_tokenizer(tokenizer)
            else:
                self._score(self._probe_ids(), probe=True)

    # ---- the teacher-source protocol --------------------------------------------------------------------------

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        """The served top-k distributions of every position of the batch.

        Args:
            inputs: The batch: ``input_ids`` (B×T), optionally ``attention_mask`` and ``labels`` (checked to fall on
                attended tokens).
            needs: The features the losses need (``{"logits"}``; checked at construction by ``check_needs``).
            sample_index: Unused (a served teacher answers any row).

        Returns:
            ``ModelFeatures(sparse_logits=...)``: B×T×k ids and log-probabilities plus each position's tail value;
                positions that predict no token of their row (the last attended one, padding) are uniform.

        Raises:
            ValueError: The batch cannot be sent as prompts (no ``input_ids``, gaps in an attention mask, a row
                longer than the server's model takes, labels on unattended positions) or the answer does not fit
                it (ids outside the vocabulary, another tokenizer, missing positions).
            TeacherServerError: The server does not answer.
        """
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "a ServedTeacher sends each row's input_ids to the server; this batch has none (inputs_embeds or "
                "another modality cannot be served)."
            )
        vocab_size = self._vocabulary()
        spans = self._spans(input_ids, inputs.get("attention_mask"))
        batch, length = input_ids.shape
        # Position t predicts token t + 1: a row's attended tokens start..stop-1 give positions start..stop-2.
        mask = torch.zeros(batch, max(length - 1, 0), dtype=torch.bool)
        for row, (start, stop) in enumerate(spans):
            mask[row, start : max(stop - 1, start)] = True
        labels = inputs.get("labels")
        if labels is not None and labels.shape == input_ids.shape:
            unanswered = labels[:, 1:].ne(-100).cpu() & ~mask
            if unanswered.any():
                raise ValueError(
                    f"row {int(unanswered.any(1).nonzero()[0])} of the batch has labels on tokens that no attended "
                    "token before them predicts (padding, or a row's first token): the server sees only the "
                    "attended tokens, so it has no prediction for them. Set those labels to -100."
                )
        answers = self._score_all([input_ids[row, start:stop].tolist() for row, (start, stop) in enumerate(spans)])
        found = [answer for answer in answers if answer is not None]
        ids = torch.tensor([entry for answer in found for entry in answer.ids], dtype=torch.long)
        logprobs = torch.tensor([entry for answer in found for entry in answer.logprobs], dtype=torch.float32)
        ids, logprobs = ids.reshape(-1, self.top_k), logprobs.reshape(-1, self.top_k)
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise ValueError(
                f"the server named token id {int(ids.max())}, outside the vocabulary of {vocab_size} entries: the "
                "served model's vocabulary is larger than the student's, so their tokenizers differ. Serve a teacher "
                "with the student's tokenizer."
            )
        rows = sparse_batch(sparse_rows(ids, logprobs, vocab_size), mask, length)
        device = input_ids.device
        return ModelFeatures(
            sparse_logits=SparseDistribution(
                rows.ids.to(device), rows.logprobs.to(device), rows.fill.to(device), vocab_size
            )
        )

    def token_rows(self, inputs: dict, mask: torch.Tensor, sample_index: torch.Tensor | None = None):
        """For chunked causal-LM KD (``chunk_size``): the served rows of the positions ``mask`` marks.

        Args:
            inputs: The batch (see :meth:`__call__`).
            mask: B×(T−1) positions to return, over the logits positions 0..T−2.
            sample_index: Unused.

        Returns:
            ``((ids, logprobs), to_logits)``: N×k rows, and a function giving their dense N×V log-probabilities.
        """
        rows = self(inputs, frozenset({"logits"})).sparse_logits[:, :-1][mask]
        vocab_size = rows.vocab_size
        return (rows.ids, rows.logprobs), lambda ids, logprobs: sparse_rows(ids, logprobs, vocab_size).dense()

    def check_compatible(self, *, student, train_dataset=None, tokenizer=None, losses=()) -> None:
        """Called by the trainer: the student must be a causal LM over the teacher's vocabulary; its tokenizer, when
        the teacher has none yet, becomes the one the engine's token strings are compared with.

        Args:
            student: The student model (its vocabulary size becomes ``vocab_size`` when that is unset).
            train_dataset: Unused (a served teacher answers any row).
            tokenizer: The trainer's ``processing_class``.
            losses: Unused (the losses read the served top-k as a cache's).

        Raises:
            ValueError: The student is not a causal LM, or its vocabulary size differs from ``vocab_size``.
        """
        if not (is_causal_lm(student) and is_token_level(student)):
            raise ValueError(
                f"a ServedTeacher scores causal-LM prompts token by token; the student is a {type(student).__name__}. "
                "Use a …ForCausalLM student."
            )
        size = output_size(student)
        if self.vocab_size is None:
            self.vocab_size = size
            if self.top_k > size:
                raise ValueError(f"top_k={self.top_k} exceeds the student's vocabulary of {size} entries.")
        elif size is not None and size != self.vocab_size:
            raise ValueError(
                f"the student's vocabulary has {size} entries and the served teacher's {self.vocab_size} "
                "(vocab_size=): distribution losses compare them entry by entry. Serve a teacher with the student's "
                "tokenizer."
            )
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
        if self.tokenizer is None and hasattr(tokenizer, "convert_ids_to_tokens"):
            self.compare_tokenizer(tokenizer)

    def attach(self, trainer) -> None:
        """From now on, errors name the trainer's step and its last complete checkpoint.

        Args:
            trainer: The trainer that reads this teacher (held weakly).
        """
        self._trainer = weakref.ref(trainer)
        self._context = self._trainer_context
        if self.tokenizer is None and not self._warned_unchecked:
            logger.warning(
                "ServedTeacher has no tokenizer (tokenizer= or the trainer's processing_class) to compare the "
                f"engine's with: only token ids outside the vocabulary of {self.vocab_size} entries are caught."
            )
            self._warned_unchecked = True

    def describe(self) -> dict:
        """The served model for summaries and cards.

        Returns:
            ``teacher`` (the model's name), ``teacher_class``, ``teacher_parameters`` (``parameters``) and
                ``teacher_server`` (url, engine, top_k).
        """
        return {
            "teacher": self.model_name,
            "teacher_class": f"ServedTeacher ({self.engine})",
            "teacher_parameters": self.parameters,
            "teacher_server": {"url": self.url, "engine": self.engine, "top_k": self.top_k},
        }

    def cache_description(self, top_k: int, mode: str, token_level: bool | None, tokenizer=None) -> dict:
        """What :func:`~hf_kd.cache.write_teacher_cache` records of this teacher in a cache's manifest, once it is
        sure this teacher can write that cache (``tokenizer``, when the teacher has none, is compared with the
        engine's).

        Args:
            top_k: The cache's k (at most this teacher's ``top_k``).
            mode: The cache's mode (only ``"top_k"``).
            token_level: The writer's ``token_level`` (unset or ``True``).
            tokenizer: The tokenizer given to the writer.

        Returns:
            The manifest's ``teacher``, ``teacher_class``, ``teacher_parameters`` and ``teacher_config`` (``None``:
                the served model is known by its name).

        Raises:
            ValueError: ``mode='sampled'``, ``top_k`` above this teacher's, ``token_level=False`` or an unknown
                vocabulary size.
        """
        if mode != "top_k":
            raise ValueError(
                f"mode={mode!r} draws ids from the teacher's whole distribution, which a served teacher does not "
                "return (only its top k): write a top_k cache."
            )
        if top_k > self.top_k:
            raise ValueError(
                f"top_k={top_k} asks for more entries than the ServedTeacher's top_k={self.top_k} brings: ask the "
                "server for at least as many (ServedTeacher(top_k=...))."
            )
        if token_level is False:
            raise ValueError("a served teacher predicts every token of a causal LM: leave token_level unset.")
        self._vocabulary()
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if self.tokenizer is None and hasattr(tokenizer, "convert_ids_to_tokens"):
            self.compare_tokenizer(tokenizer)
        description = self.describe()
        return {key: description[key] for key in ("teacher", "teacher_class", "teacher_parameters")} | {
            "teacher_config": None  # the server's model is known by its name only
        }

    # ---- public helpers ---------------------------------------------------------------------------------------

    def compare_tokenizer(self, tokenizer) -> None:
        """Compare the engine's tokenizer with ``tokenizer`` now (a probe spread over its vocabulary) and on every
        token id the engine names later.

        Args:
            tokenizer: The tokenizer the batches are made with.

        Raises:
            ValueError: The engine's string for a token id is none of this tokenizer's, or the engine reports no
                strings and ``check_tokenizer`` is set.
        """
        self.tokenizer = tokenizer
        self._strings = {}
        self._score(self._probe_ids(), probe=True)

    @contextlib.contextmanager
    def during(self, phase: str, resume_hint: str):
        """Errors inside the block say they happened at ``phase`` and end with ``resume_hint``.

        Args:
            phase: Where the requests are made (``"writing the teacher cache in ... (examples 0 to 7)"``).
            resume_hint: What to do once the server answers again.

        Yields:
            This teacher.
        """
        saved = self._context
        self._context = lambda: (phase, resume_hint)
        try:
            yield self
        finally:
            self._context = saved

    def close(self) -> None:
        """Close the kept connections (a later request opens new ones)."""
        while True:
            try:
                self._sessions.get_nowait().close()
            except queue.Empty:
                return

    # ---- requests ---------------------------------------------------------------------------------------------

    def _trainer_context(self) -> tuple[str, str]:
        """The attached trainer's step and the checkpoint a resumed run continues from."""
        trainer = self._trainer()
        if trainer is None:
            return "a request", ""
        step = trainer.state.global_step
        phase = f"training step {step + 1}" if trainer.model.training else f"evaluation after step {step}"
        checkpoint = last_complete_checkpoint(trainer.args.output_dir)
        if checkpoint is None:
            return phase, "No checkpoint was saved before it (save_strategy, save_steps): training starts over."
        return phase, (
            f"The last complete checkpoint is {checkpoint}: once the server answers again, "
            "trainer.train(resume_from_checkpoint=True) continues from it."
        )

    def _vocabulary(self) -> int:
        if self.vocab_size is None:
            raise ValueError(
                "the served teacher's vocabulary size is unknown: pass ServedTeacher(vocab_size=...) (the teacher's "
                "config.vocab_size); a DistillationTrainer takes the student's."
            )
        return self.vocab_size

    def _spans(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[int, int]]:
        """Each row's attended tokens as one ``(start, stop)`` span (right or left padding)."""
        batch, length = input_ids.shape
        if attention_mask is None:
            spans = [(0, length)] * batch
        else:
            spans = []
            for row, attended in enumerate(attention_mask.bool().cpu()):
                where = attended.nonzero().flatten()
                if len(where) == 0:
                    spans.append((0, 0))
                    continue
                start, stop = int(where[0]), int(where[-1]) + 1
                if stop - start != len(where):
                    raise ValueError(
                        f"row {row} of the batch attends to tokens with gaps between them (packed sequences?): a "
                        "served teacher sends each row's attended tokens as one prompt. Give rows with one span of "
                        "attended tokens (right or left padding)."
                    )
                spans.append((start, stop))
        if self.max_model_len is not None:
            for row, (start, stop) in enumerate(spans):
                if stop - start + 1 > self.max_model_len:  # the prompt plus the one token the request generates
                    raise ValueError(
                        f"row {row} of the batch has {stop - start} tokens; the served model takes at most "
                        f"{self.max_model_len} with the one it generates (its max_model_len). Shorten the rows "
                        "(max_length) or serve the model with a longer --max-model-len."
                    )
        return spans

    def _probe_ids(self) -> list[int]:
        """Token ids for the probe request: spread over the tokenizer's vocabulary (each id's string is compared),
        else the first few ids."""
        if self.tokenizer is None:
            ids = list(range(min(8, self.vocab_size or 8)))
        else:
            limit = min(len(self.tokenizer), self.vocab_size or len(self.tokenizer))
            count = min(PROBE_LENGTH, limit)
            ids = sorted({round(index * (limit - 1) / max(count - 1, 1)) for index in range(count)})
        return ids if self.max_model_len is None else ids[: self.max_model_len - 1]

    def _score_all(self, prompts: list[list[int]]) -> list[_Answer | None]:
        """One request per prompt of at least two tokens (a shorter one predicts nothing in the batch), up to
        ``max_concurrency`` at once; the first failure stops the others' retries and is raised."""
        answers: list[_Answer | None] = [None] * len(prompts)
        todo = [(row, prompt) for row, prompt in enumerate(prompts) if len(prompt) >= 2]
        if not todo:
            return answers
        self._abort.clear()
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(todo)), thread_name_prefix="hf_kd-served")
        interrupted = False
        try:
            futures = {pool.submit(self._score, prompt): row for row, prompt in todo}
            for future in as_completed(futures):
                answers[futures[future]] = future.result()
            for answer in answers:  # here, not in the threads: tokenizers are not shared across threads
                if answer is not None:
                    self._check_strings(answer.strings)
        except BaseException as error:
            self._abort.set()
            interrupted = isinstance(error, KeyboardInterrupt)
            raise
        finally:
            # No thread outlives the batch (the others stop retrying), except after Ctrl-C: then nobody waits for
            # requests in flight, which end by their timeout.
            pool.shutdown(wait=not interrupted, cancel_futures=True)
        return answers

    def _score(self, prompt: list[int], probe: bool = False) -> _Answer:
        """The engine's answer for one prompt, checked (see :meth:`_parse`)."""
        if probe:  # a probe runs alone: a failed batch before it must not cut its retries short
            self._abort.clear()
        k = self.top_k
        if self.engine == "vllm":
            payload = {
                "model": self.model_name,
                "prompt": prompt,
                "max_tokens": 1,
                "temperature": 1.0,
                "top_p": 1.0,
                "prompt_logprobs": k,
                "return_token_ids": True,  # vLLM >= 0.10.2 echoes the prompt's ids (older versions ignore it)
            }
            path = "/v1/completions"
        else:
            payload = {
                "input_ids": prompt,
                "sampling_params": {"max_new_tokens": 1, "temperature": 1.0, "top_p": 1.0},
                "return_logprob": True,
                "logprob_start_len": 0,
                "top_logprobs_num": k,
                "return_text_in_logprobs": True,
            }
            path = "/generate"
        try:
            body = self._request("POST", path, payload)
        except _Refused as refusal:
            if probe:
                raise self._probe_refusal(refusal) from None
            phase, hint = self._context()
            raise TeacherServerError(
                f"the teacher server at {self.url}{path} refused a request at {phase} ({refusal}); it will refuse it "
                f"again, so nothing was retried. {hint}".strip()
            ) from None
        answer = self._parse(body, prompt)
        if probe:
            self._check_strings(answer.strings)
        return answer

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        """The JSON answer to one request, tried again on connection errors, timeouts and HTTP 408/429/5xx."""
        url = self.url + path
        try:
            session = self._sessions.get_nowait()
        except queue.Empty:
            session = requests.Session()
        started, tries, last = time.monotonic(), 0, ""
        try:
            for attempt in range(self.retries + 1):
                if attempt and self._abort.wait(self.backoff * 2 ** (attempt - 1)):
                    break  # another row of the batch failed: its error is the one raised
                tries += 1
                try:
                    response = session.request(method, url, json=payload, timeout=self.timeout, headers=self._headers)
                except requests.Timeout:
                    last = f"no answer within timeout={self.timeout} s"
                    continue
                except requests.ConnectionError as error:
                    last = f"cannot connect ({_root_cause(error)})"
                    continue
                if response.status_code in RETRIED_STATUS:
                    last = f"HTTP {response.status_code}: {_server_message(response)}"
                    continue
                if response.status_code >= 400:
                    raise _Refused(response.status_code, _server_message(response))
                try:
                    return response.json()
                except ValueError:
                    raise ValueError(
                        f"the teacher server at {url} answered HTTP {response.status_code} with something that is not "
                        f"JSON ({response.text[:200]!r}): is it a {self.engine} server?"
                    ) from None
        finally:
            self._sessions.put(session)
        phase, hint = self._context()
        raise TeacherServerError(
            f"the teacher server at {url} did not answer at {phase} after {tries} tries over "
            f"{time.monotonic() - started:.1f} s (timeout={self.timeout} s, retries={self.retries}): {last}. {hint}"
        )

    def _discover(self, model: str | None) -> tuple[str | None, int | None]:
        """The served model's name and its longest sequence (``None`` where the server does not say)."""
        with self.during("the probe request at construction", ""):
            if self.engine == "sglang":
                try:
                    info = self._request("GET", "/get_model_info")
                except _Refused:  # an SGLang without that route: its one model is served anyway
                    return model, None
                return model or info.get("model_path"), None
            try:
                listed = self._request("GET", "/v1/models").get("data") or []
            except _Refused as refusal:
                raise ValueError(
                    f"{self.url}/v1/models answered {refusal}: is this an OpenAI-compatible vLLM server?"
                ) from None
        names = [entry.get("id") for entry in listed]
        if model is None:
            if len(listed) != 1:
                raise ValueError(f"the server at {self.url} serves {names}: choose one with model=.")
            entry = listed[0]
        elif model in names:
            entry = listed[names.index(model)]
        else:
            raise ValueError(f"the server at {self.url} does not serve {model!r}; it serves {names}.")
        return entry.get("id"), entry.get("max_model_len")

    def _probe_refusal(self, refusal: _Refused) -> ValueError:
        """What a refused probe means for this set-up."""
        cap = re.search(r"max allowed:?\s*(\d+)", refusal.message)
        if cap is not None:
            return ValueError(
                f"the server caps log-probabilities at {cap.group(1)} per position and top_k={self.top_k} was asked: "
                + (
                    f"start it with --max-logprobs {self.top_k} or more (vLLM's default is 20)"
                    if self.engine == "vllm"
                    else f"raise {_CAP_FLAG[self.engine]}"
                )
                + f", or use top_k <= {cap.group(1)}. The server said: {refusal.message}"
            )
        return ValueError(
            f"the teacher server at {self.url} refused the probe request ({refusal}): check url=, model= and "
            f"engine={self.engine!r}."
        )

    # ---- answers ----------------------------------------------------------------------------------------------

    def _parse(self, body: dict, prompt: list[int]) -> _Answer:
        """Top-k ids and log-probabilities for prompt tokens 1..n−1, after checking the answer covers this prompt
        (same tokens, every position, k entries each) with log-probabilities."""
        if self.engine == "vllm":
            choice = (body.get("choices") or [{}])[0]
            positions = choice.get("prompt_logprobs")
            if positions is None:
                raise ValueError(
                    f"the server at {self.url} answered without prompt_logprobs: it is not a vLLM OpenAI-compatible "
                    "server (>= 0.5.5), which returns them for /v1/completions. SGLang: engine='sglang'."
                )
            echoed = choice.get("prompt_token_ids")
            entries = [
                None
                if position is None
                else [(int(i), e.get("logprob"), e.get("decoded_token")) for i, e in position.items()]
                for position in positions
            ]
        else:
            meta = body.get("meta_info") or {}
            tokens, positions = meta.get("input_token_logprobs"), meta.get("input_top_logprobs")
            if tokens is None or positions is None:
                raise ValueError(
                    f"the server at {self.url} answered /generate without input_token_logprobs/input_top_logprobs: "
                    "is it an SGLang server?"
                )
            echoed = [int(entry[1]) for entry in tokens]
            # input_top_logprobs lists the top k; the prompt token's own entry comes from input_token_logprobs.
            entries = [
                None
                if not top
                else [(int(e[1]), e[0], e[2] if len(e) > 2 else None) for e in top]
                + [(int(t[1]), t[0], t[2] if len(t) > 2 else None)]
                for top, t in zip(positions, tokens)
            ]
        if echoed is not None and list(echoed) != list(prompt):
            raise ValueError(
                f"the server scored other tokens than it was sent ({len(echoed)} tokens, first {list(echoed)[:5]}, for "
                f"{len(prompt)} sent, first {prompt[:5]}): it added or changed tokens (a BOS?), so its positions do "
                "not match the batch's."
            )
        if len(entries) != len(prompt):
            raise ValueError(
                f"the server answered for {len(entries)} prompt tokens where {len(prompt)} were sent: it added or "
                "removed tokens (a BOS?), so its positions do not match the batch's."
            )
        answered = sum(position is not None for position in entries[1:])
        if answered != len(prompt) - 1:
            raise ValueError(
                f"the server returned log-probabilities for {answered} of the {len(prompt) - 1} predicted tokens of a "
                f"{len(prompt)}-token prompt: a prefix cache answers cached tokens without them. Start the server "
                f"with {_PREFIX_CACHE_FLAG[self.engine]}."
            )
        wanted = min(self.top_k, self.vocab_size or self.top_k)
        ids, logprobs, strings = [], [], {}
        for index in range(1, len(prompt)):
            position = {token: (value, text) for token, value, text in entries[index]}
            for token, (_, text) in position.items():
                strings.setdefault(token, text)
            if prompt[index] not in position:
                raise ValueError(
                    f"the server's log-probabilities for prompt token {index} do not include that token "
                    f"({prompt[index]}): they are not the prompt's, so their alignment cannot be trusted."
                )
            ranked = sorted(position.items(), key=lambda item: -_as_float(item[1][0]))[: self.top_k]
            if len(ranked) < wanted:
                raise ValueError(
                    f"the server returned {len(ranked)} log-probabilities for a position where top_k={self.top_k} "
                    f"were asked: it caps them lower ({_CAP_FLAG[self.engine]}). Use top_k <= {len(ranked)} or raise "
                    "the cap."
                )
            values = [_as_float(value) for _, (value, _) in ranked]
            total = sum(math.exp(value) for value in values)
            if max(values) > LOGPROB_TOLERANCE or total > 1 + LOGPROB_TOLERANCE:
                raise ValueError(
                    f"the server returned values that are not log-probabilities (largest {max(values):.4g}, top-k "
                    f"probabilities summing to {total:.4g}): a vLLM started with --logprobs-mode raw_logits or "
                    "processed_logits returns logits. ServedTeacher needs log-probabilities (vLLM's default "
                    "raw_logprobs)."
                )
            ids.append([token for token, _ in ranked])
            logprobs.append(values)
        return _Answer(ids, logprobs, strings)

    def _check_strings(self, strings: dict[int, str | None]) -> None:
        """The engine's string for each token id it named is one of this tokenizer's for that id."""
        if self.tokenizer is None:
            return
        for token, text in sorted(strings.items()):
            if token in self._strings:
                continue
            if text is None:
                if self.check_tokenizer:
                    raise ValueError(
                        f"the server at {self.url} sends no token strings (a server started with "
                        "--skip-tokenizer-init?), so its tokenizer cannot be compared with this one. Serve it with "
                        "its tokenizer, or pass check_tokenizer=False to trust that the vocabularies match."
                    )
                continue
            local = self._local_strings(token)
            if text not in local:
                raise ValueError(
                    f"the served model's tokenizer differs from this one: token id {token} is {text!r} on the server "
                    f"and {sorted(local)[0]!r} here, so the teacher's distributions belong to other tokens. Serve a "
                    "teacher that shares the student's tokenizer (or give the tokenizer the batches were made with)."
                )
            self._strings[token] = local

    def _local_strings(self, token: int) -> set[str]:
        """What an engine may send for ``token``: the tokenizer's token (vLLM up to 0.10) or its decoded text."""
        tokenizer = self.tokenizer
        if token >= len(tokenizer):
            return {""}  # an id past the tokenizer (a padded embedding): engines send an empty string
        forms = {tokenizer.convert_ids_to_tokens(token), tokenizer.decode([token])}
        forms.add(tokenizer.decode([token], skip_special_tokens=True))
        return {form for form in forms if form is not None}


def _as_float(value) -> float:
    """A JSON log-probability (``-Infinity`` arrives as a float; ``None`` counts as -inf)."""
    return float("-inf") if value is None else float(value)


def _server_message(response: requests.Response) -> str:
    """The server's own words: vLLM's and SGLang's ``{"error": {"message": ...}}`` or ``{"message": ...}``."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason or ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])
    return str(body)[:500]


def _root_cause(error: BaseException) -> str:
    """The innermost reason of a connection error (``[Errno 111] Connection refused``, ...)."""
    reason = error.args[0] if error.args else error
    reason = getattr(reason, "reason", reason)
    text = str(reason)
    return text.split(": ", 1)[-1] if "Failed to establish" in text else text[:300]
