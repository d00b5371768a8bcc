"""One thread owns the model; requests queue up and are generated in batches.

Requests that arrive while a batch runs wait in the queue, at most `slice_seconds`: then
the running batch pauses (its rows stop at the next token, keeping what they wrote), goes
to the back of the queue, and the next batch takes the oldest waiting request and every
waiting request with the same sampling settings (up to `max_batch_size`), paused ones
included, which go on from where they were (their prompt plus what they wrote is read
again). So a 4-token request never waits for a 400-token one to finish, concurrent
requests share one `generate` call, and each still gets its own tokens, stop words, limit
and stream. Greedy replies in a batch, paused or not, are the same as alone (tested).

A scoring job (the log-probs of a prompt's own tokens: `echo` with `logprobs`) is one forward over
its prompt, run by the same thread between batches.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from tuner.generation.generate import GenerationSettings, Generator, Reply


@dataclass
class Job:
    prompt: list[int]
    settings: GenerationSettings
    pixel_values: object = None
    """LLaVA: the prompt's images (n, 3, H, W), in the order of their tokens"""
    events: queue.Queue = field(default_factory=queue.Queue)
    """('text', piece) while generating, then ('done', Reply) or ('error', exception)"""
    cancelled: threading.Event = field(default_factory=threading.Event)
    continued: tuple | None = None
    """(ids, characters streamed, log-probs) of the reply so far, when a batch was paused to let others in"""
    logprobs: int | None = None
    """None, or how many of the most likely tokens the reply lists beside each of its tokens' log-prob"""
    score: int | None = None
    """a scoring job, not a generation: the prompt's log-probs, with this many most likely tokens each"""

    def texts_then_reply(self, timeout: float | None = None):
        """Yield text pieces; return the Reply (raise the engine's exception)."""
        while True:
            kind, value = self.events.get(timeout=timeout)
            if kind == "text":
                yield value
            elif kind == "done":
                return value
            else:
                raise value

    def wait(self, gone=None, poll_seconds: float = 0.25) -> Reply:
        """The reply. `gone()`: asked every `poll_seconds`; once true the job is cancelled (its row stops
        generating at the next token) and ConnectionResetError is raised."""
        checked = time.monotonic()
        while True:
            try:
                kind, value = self.events.get(timeout=poll_seconds if gone else None)
            except queue.Empty:
                kind = value = None
            if gone and time.monotonic() - checked >= poll_seconds:  # text events may never let the queue empty
                checked = time.monotonic()
                if gone():
                    self.cancelled.set()
                    raise ConnectionResetError("the client disconnected")
            if kind == "done":
                return value
            if kind == "error":
                raise value


class BatchEngine:
    def __init__(self, generator: Generator, max_batch_size: int = 16, gather_seconds: float = 0.005,
                 slice_seconds: float = 1.0):
        self.generator, self.max_batch_size, self.gather_seconds = generator, max_batch_size, gather_seconds
        self.slice_seconds = slice_seconds  # how long a waiting request waits before the running batch pauses
        self.pending: deque[Job] = deque()
        self.ready = threading.Condition()
        self.batches: list[int] = []  # sizes of the batches run, for tests and figures
        threading.Thread(target=self._loop, name="tuner-generate", daemon=True).start()

    def submit(self, job: Job) -> Job:
        with self.ready:
            self.pending.append(job)
            self.ready.notify()
        return job

    def _next_batch(self) -> list[Job]:
        with self.ready:
            while not self.pending:
                self.ready.wait()
        time.sleep(self.gather_seconds)  # let requests sent together arrive together
        with self.ready:
            key = _key(self.pending[0])
            batch, rest = [], deque()
            while self.pending:
                job = self.pending.popleft()
                if job.cancelled.is_set():
                    continue
                if _key(job) == key and len(batch) < self.max_batch_size:
                    batch.append(job)
                else:
                    rest.append(job)
            self.pending = rest
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                continue
            if batch[0].score is not None:
                for job in batch:
                    try:
                        job.events.put(("done", self.generator.prompt_logprobs(job.prompt, job.score)))
                    except Exception as e:  # noqa: BLE001 - the request hears about it
                        job.events.put(("error", e))
                continue
            self.batches.append(len(batch))
            started = time.monotonic()

            def pause() -> bool:  # someone waits, and this batch has had its slice
                return bool(self.pending) and time.monotonic() - started > self.slice_seconds

            def done(job: Job, reply) -> None:
                if reply.finish_reason == "cancelled" and not job.cancelled.is_set():  # paused: goes on later,
                    job.continued = (reply.ids, reply.streamed, reply.logprobs)  # behind the requests that wait
                    with self.ready:
                        self.pending.append(job)
                        self.ready.notify()
                else:
                    job.events.put(("done", reply))

            try:
                self.generator.generate(
                    [job.prompt for job in batch], batch[0].settings,
                    on_text=[(lambda piece, job=job: job.events.put(("text", piece))) for job in batch],
                    cancelled=[(lambda job=job: job.cancelled.is_set() or pause()) for job in batch],
                    continued=[job.continued for job in batch],
                    on_done=[(lambda reply, job=job: done(job, reply)) for job in batch],
                    max_new_tokens=[job.settings.max_new_tokens for job in batch],
                    stop=[job.settings.stop for job in batch], logprobs=[job.logprobs for job in batch],
                    # rows are filled in order, so the batch's images are each row's images in turn
                    pixel_values=_concatenated([job.pixel_values for job in batch]))
            except Exception as e:  # noqa: BLE001 - every waiting request must hear about it
                for job in batch:
                    job.events.put(("error", e))


def _key(job: Job) -> tuple:
    """Jobs with equal keys run together: scoring jobs, or generations with the same sampling settings."""
    return ("score",) if job.score is not None else job.settings.batch_key()


def _concatenated(pixel_values: list):
    import torch

    present = [p for p in pixel_values if p is not None]
    return torch.cat(present) if present else None
