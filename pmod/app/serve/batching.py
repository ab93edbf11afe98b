"""Continuous batching on the compute thread: every active request advances one token per step.

A request joins after its prefill, which runs alone on the engine (resumed from the conversation
cache where it can be) between two decode steps; its context then becomes a row of the engine's
:class:`~pmod.engine.DecodeBatch`, where the per-layer caches keep their own lengths (a MoD
layer's hold only the tokens it kept). Each step samples every row with its own sampler,
streams its text (stop strings as in a serial reply, :class:`~pmod.app.session.ReplyText`)
and applies the same rules (:class:`~pmod.app.generate.Decoding`). A finished, failed or
cancelled request leaves at once; a finished one's context goes to the conversation cache.
"""

from __future__ import annotations

import queue
import time
import traceback
from dataclasses import dataclass, field

from pmod.app.generate import Decoding, Sampler, SamplerArgs, prefill_prompt
from pmod.app.serve.compute import Job
from pmod.app.serve.errors import RequestError, internal_error
from pmod.errors import PmodError


@dataclass(eq=False)
class _Row:
    job: Job
    sampler: Sampler
    rules: Decoding
    text: object  # ReplyText
    reply: object  # Reply
    pending: object  # Pending
    position: int  # tokens in the row's context
    token: int = 0  # the token to feed next step
    fed: list = field(default_factory=list)  # reply tokens fed so far


class Batcher:
    """Runs the jobs put in ``waiting`` on ``session`` (on the compute thread) ``max_batch`` at a time:
    :meth:`drain` until none is waiting or running. ``finish(job)`` is called once per job as it leaves."""

    def __init__(self, session, max_batch: int, waiting: queue.Queue, finish, log):
        self.session, self.max_batch, self.finish, self.log = session, max_batch, finish, log
        self.waiting = waiting
        self.rows: dict[int, _Row] = {}
        self.batch = session.engine.new_batch()
        self.peak = 0  # the most rows decoded together

    def drain(self) -> None:
        while True:
            while len(self.rows) < self.max_batch:
                try:
                    job = self.waiting.get_nowait()
                except queue.Empty:
                    break
                self._join(job)
            if not self.rows:
                return
            self.peak = max(self.peak, len(self.rows))
            self._step()

    def _join(self, job: Job) -> None:
        from pmod.app.session import Reply, ReplyText

        if job.cancelled.is_set():
            return self.finish(job)
        r, s = job.request, self.session
        reply = Reply()
        try:
            sampler = Sampler(SamplerArgs(r.temp, r.top_p, r.seed))
            start = s.start(r.messages, r.images, system=r.system)
            reply.stats.resumed_tokens = start["pending"].resumed
            logits = prefill_prompt(s.engine, reply.stats, **start["inputs"])
            rules = Decoding(sampler, r.max_tokens, () if r.ignore_eos else s.eos_ids,
                             s.config.max_position_embeddings, reply.stats)
            row = _Row(job, sampler, rules, ReplyText(s.tokenizer, r.stop, reply), reply, start["pending"],
                       s.engine.position)
            going = self._advance(row, sampler(logits))  # the first token out before the bookkeeping
            if not job.cancelled.is_set():
                context = s.engine.save_context()
                s.remember(row.pending, [], context)  # the prompt alone, for requests that share it
                if going:
                    self.rows[self.batch.add(context)] = row
        except PmodError as e:
            job.events.put(("error", RequestError(str(e), "messages")))
            self.finish(job)
        except Exception as e:  # noqa: BLE001 - reported as a 500, the others go on
            self.log(f"internal error:\n{traceback.format_exc().rstrip()}")
            job.events.put(("error", internal_error(e)))
            self.finish(job)

    def _advance(self, row: _Row, token: int) -> bool:
        """Take ``token`` into ``row``'s reply (as ``Session._stream`` does); whether the row goes on
        (else its job has been finished)."""
        events = row.job.events
        if row.job.cancelled.is_set():  # the client is gone: its row and cache entry go now
            self.session.forget(row.pending)
            self.finish(row.job)
            return False
        if row.rules.take(token):
            piece = row.text.add(token)
            if piece:
                events.put(("piece", piece))
            if not row.text.stopped and row.rules.more(row.position):
                row.token = token
                return True
        if not row.text.stopped:
            piece = row.text.finish()
            if piece:
                events.put(("piece", piece))
        events.put(("done", row.reply))
        self.finish(row.job)
        return False

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            logits = self.batch.step({i: row.token for i, row in self.rows.items()})
        except Exception as e:  # noqa: BLE001 - these rows fail, the server keeps serving
            self.log(f"internal error:\n{traceback.format_exc().rstrip()}")
            for i, row in list(self.rows.items()):
                row.job.events.put(("error", internal_error(e)))
                self.finish(row.job)
                self._leave(i, row, keep=False)
            return
        dt = time.perf_counter() - t0
        for i, out in logits.items():
            row = self.rows[i]
            row.rules.fed(dt)
            row.fed.append(row.token)
            row.position += 1
            if not self._advance(row, row.sampler(out)):
                self._leave(i, row, keep=not row.job.cancelled.is_set())

    def _leave(self, i: int, row: _Row, keep: bool) -> None:
        """Row ``i`` out of the batch; ``keep``: its context into the conversation cache."""
        context = self.batch.remove(i)
        del self.rows[i]
        row.reply.stats.context_tokens = context.position
        row.reply.stats.kv_lengths = [len(k) for k in context.kept]
        if keep:
            self.session.remember(row.pending, row.fed, context)
