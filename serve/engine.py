"""One model instance behind a first-in-first-out queue, generating in one worker thread.

Generation is blocking NumPy / ONNX Runtime work, so it runs in a thread of its own and the event loop stays
free to answer /health, /metrics and 429s while it runs. Requests are admitted (a place in the queue taken,
or 429) before their image is decoded, then queued; the worker takes them in order. Each token it generates
passes through a callback that is also the only place a generation can be stopped early: a cancelled job (the
client went away, or the shutdown deadline passed) or a matched stop string raises there, so the slot is freed
at the next token and the model is left as after any generation (the generator keeps no state between calls
beyond a spare KV buffer, which an aborted call simply does not hand back).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from mllm_deploy.core.errors import MllmError
from mllm_deploy.runtime.prompt import TextStreamer
from mllm_deploy.runtime.sampling import SamplingConfig
from mllm_deploy.serve.protocol import ApiError

log = logging.getLogger("mllm_deploy.serve")


@dataclass
class Work:
    """A request ready for the model: everything checked, the image preprocessed."""
    input_ids: object  # np.ndarray [1, T]
    pixel_values: object  # np.ndarray [1, 3, H, W]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


# ---- what a job tells its HTTP handler, in order: Delta*, then one Finished or Failed ----
@dataclass
class Delta:
    text: str
    token_ids: list[int]


@dataclass
class Finished:
    reason: str  # "stop" or "length", as OpenAI's finish_reason
    token_ids: list[int]
    prompt_tokens: int


@dataclass
class Failed:
    error: ApiError


class Job:
    """One admitted request. Its events cross from the worker thread to the event loop through
    ``call_soon_threadsafe``; ``cancelled`` is read by the worker at every token."""

    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop):
        self.work = work
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled: str | None = None
        self.done = False
        self.enqueued = time.perf_counter()
        self._loop = loop

    def post(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass


class StopMatcher:
    """Cuts the answer before the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buffer = self.held + text
        found = [at for at in (buffer.find(s) for s in self.stops) if at >= 0]
        if found:
            self.held = ""
            return buffer[:min(found)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buffer) + 1))
                    if buffer.endswith(s[:k])), default=0)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def finish(self, text: str) -> tuple[str, bool]:
        out, hit = self.push(text)
        if not hit:
            out, self.held = out + self.held, ""
        return out, hit


class _Stop(Exception):
    """Raised from the token callback: a stop string matched."""


class _Cancelled(Exception):
    """Raised from the token callback: the job was cancelled."""


class QueueFull(ApiError):
    def __init__(self, retry_after: int):
        super().__init__(429, "the server's queue is full; retry later", code="queue_full",
                         headers={"Retry-After": str(retry_after)})


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", code="shutting_down")


class Engine:
    """The queue and the worker. Its counters change under one lock, taken by the event loop (admit, submit,
    cancel) and by the worker (take the next job, finish one)."""

    def __init__(self, pipe, max_queue: int, metrics):
        self.pipe = pipe  # runtime.pipeline.Pipeline, its sessions loaded
        self.max_queue = max_queue  # requests that may wait behind the one being generated
        self.metrics = metrics  # serve.metrics.Metrics
        self._lock = threading.Condition()
        self._queue: deque[Job] = deque()
        self._admitted = 0  # places taken: waiting (image being prepared, or queued) + running
        self._running: Job | None = None
        self._closing = self._stopped = False
        self._mean_seconds = 1.0  # a running mean of generation time, for Retry-After
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="mllm-generate", daemon=True)
        self._thread.start()

    # ---- the event loop's side ----------------------------------------------------------
    def admit(self) -> None:
        """Take a place in the queue, or refuse: 503 while shutting down, 429 when full."""
        with self._lock:
            if self._closing:
                raise shutting_down()
            if self._admitted > self.max_queue:
                self.metrics.rejected.inc()
                waiting = self._admitted - (self._running is not None)
                raise QueueFull(max(1, math.ceil(self._mean_seconds * (waiting + 1))))
            self._admitted += 1
            self._update_gauges()

    def withdraw(self) -> None:
        """Give back a place taken by :meth:`admit` whose request never reached the queue."""
        with self._lock:
            self._admitted -= 1
            self._update_gauges()

    def submit(self, work: Work) -> Job:
        """Queue an admitted request (the caller withdraws its place if this raises)."""
        job = Job(work, asyncio.get_running_loop())
        with self._lock:
            if self._closing:
                raise shutting_down()
            self._queue.append(job)
            self._lock.notify()
        return job

    def cancel(self, job: Job, error: ApiError | None = None) -> None:
        """Stop a job wherever it is: out of the queue now, or (running) at its next token. Its handler gets
        ``error`` (none is needed when the client is gone). A finished job is left alone."""
        with self._lock:
            if job.done:
                return
            job.done, job.cancelled = True, "cancelled"
            if job in self._queue:
                self._queue.remove(job)
                self._admitted -= 1
                self.metrics.generations.labels(outcome="cancelled").inc()
                self._update_gauges()
        job.post(Failed(error or ApiError(499, "cancelled")))

    def begin_shutdown(self, timeout: float) -> None:
        """No new requests from now on; those admitted get ``timeout`` seconds to finish, then are cancelled."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        log.info("shutting down: %d request(s) in flight get %.1f s to finish", self._admitted, timeout)
        asyncio.get_running_loop().call_later(timeout, self.cancel_all)

    @property
    def closing(self) -> bool:
        return self._closing

    def cancel_all(self) -> None:
        with self._lock:
            jobs = list(self._queue) + ([self._running] if self._running is not None else [])
        for job in jobs:
            self.cancel(job, shutting_down())

    def stop(self, timeout: float) -> bool:
        """End the worker (cancelling what is left); whether it stopped within ``timeout``."""
        with self._lock:
            self._closing = self._stopped = True
            self._lock.notify_all()
        self.cancel_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def snapshot(self) -> dict:
        with self._lock:
            return {"queue_depth": self._admitted - (self._running is not None), "running": self._running is not None}

    def _update_gauges(self) -> None:  # with the lock held
        self.metrics.queue_depth.set(self._admitted - (self._running is not None))
        self.metrics.running.set(int(self._running is not None))

    # ---- the worker thread ----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return
                job = self._running = self._queue.popleft()
                self._update_gauges()
            outcome = "error"
            try:
                outcome = self._generate(job)
            except Exception:  # never lose the worker, nor leave the request waiting: the next one must be served
                log.exception("generation failed")
                self._fail(job, ApiError(500, "generation failed (the server log says why)", code="generation_failed"))
            finally:
                with self._lock:
                    self._running, job.done = None, True
                    self._admitted -= 1
                    self._update_gauges()
                self.metrics.generations.labels(outcome=outcome).inc()

    def _generate(self, job: Job) -> str:
        work, pipe, metrics = job.work, self.pipe, self.metrics
        start = time.perf_counter()
        metrics.queue_wait.observe(start - job.enqueued)
        streamer, stopper = TextStreamer(pipe.prompt), StopMatcher(work.stop)
        tokens: list[int] = []
        pending: list[int] = []  # ids not yet sent with a piece of text
        last, first = [start], [start]

        def on_token(token: int) -> None:
            now = time.perf_counter()
            if tokens:
                metrics.decode.observe(now - last[0])
            else:
                metrics.prefill.observe(now - start)
                first[0] = now
            last[0] = now
            if job.cancelled:
                raise _Cancelled
            tokens.append(token)
            pending.append(token)
            text, hit = stopper.push(streamer.push(token))
            if text or hit:
                job.post(Delta(text, pending.copy()))
                pending.clear()
            if hit:
                raise _Stop

        if job.cancelled:  # cancelled between leaving the queue and here
            return "cancelled"
        reason = "stop"
        try:
            generation = pipe.generator.generate(work.input_ids, work.pixel_values, work.max_new_tokens,
                                                 work.sampling, on_token, ignore_eos=work.ignore_eos)
            reason = "stop" if generation.stop_reason == "eos" else "length"
            # what the streamer held back (an incomplete character at the end) and the stop matcher still holds
            text, hit = stopper.finish(pipe.prompt.decode(tokens)[len(streamer.emitted):])
            reason = "stop" if hit else reason
            if text or pending:
                job.post(Delta(text, pending.copy()))
        except _Stop:
            pass
        except _Cancelled:
            return "cancelled"
        except MllmError as exc:  # NaN logits and the like: this request's failure, not the server's
            self._fail(job, ApiError(500, f"generation failed: {exc}", code="generation_failed"))
            return "error"
        except Exception as exc:
            log.exception("generation failed")
            self._fail(job, ApiError(500, f"generation failed: {type(exc).__name__}", code="generation_failed"))
            return "error"
        finally:  # what the model did, whatever became of the request
            if last[0] != start:  # prefilled: the callback ran at least once
                metrics.prompt_tokens.inc(work.prompt_tokens)
            metrics.generated_tokens.inc(len(tokens))
        seconds = time.perf_counter() - start
        metrics.generation_seconds.observe(seconds)
        if len(tokens) > 1:
            metrics.tokens_per_second.set((len(tokens) - 1) / max(last[0] - first[0], 1e-9))
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
        with self._lock:
            if job.done:  # cancelled between the last token and here
                return "cancelled"
            job.done = True
        job.post(Finished(reason, tokens, work.prompt_tokens))
        return reason

    def _fail(self, job: Job, error: ApiError) -> None:
        with self._lock:
            if job.done:
                return
            job.done = True
        job.post(Failed(error))
