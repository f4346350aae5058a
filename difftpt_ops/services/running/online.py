"""Online runs: a method that carries state from sample to sample (TDA, DMN-ZS, DPE, BoostAdapter, OnZeta, ECALP,
OGA, DynaPrompt), run as an ordered chain.

An online run processes the samples of its dataset version one after another, in the order of a seeded
permutation (the spec's `order_seed`, so the order is part of the run's identity). Its shards are ranges
of positions in that order and form a chain:

- Shard k is claimable only when shard k-1 is done: the claim is one conditional UPDATE that checks the
  previous shard, so two workers never process one online run at once, however many messages the
  broker holds (a second delivery finds nothing to claim and takes other work).
- The task that finishes shard k hands shard k+1 to its caller as a follow-up ticket, sent after the commit
  (the embedded executor just runs the shards in order).
- After the last sample of shard k, the method's state (and the shard's prediction logits) is written as a
  safetensors file to the artifact store (`checkpoints`), then one transaction stores the shard's predictions, the
  checkpoint row pointing at that file and the shard's `done`: the file always exists before its row, and
  a shard's predictions never exist without the state that follows them.
- A shard starts from the newest checkpoint of an earlier shard whose file is intact (size and sha256 as the
  row recorded). A file cut short is moved aside and the one before it is used: the shards in between are
  replayed (their predictions are stored already; replay only rebuilds the state and rewrites their files).
  Since every step is deterministic, a resumed run reproduces the uninterrupted one exactly.

Nothing is written for a shard until it ends: a worker killed mid-shard leaves the previous checkpoint as
the resume point, and the shard is re-queued like any other (heartbeat, stale check, `resume`).
"""

from __future__ import annotations

import logging
import time
import traceback
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, exists, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import utcnow
from difftpt_ops.core.errors import InputError, SampleError, TransientError
from difftpt_ops.core.method_specs import CORE_METHODS
from difftpt_ops.core.run_specs import stream_order
from difftpt_ops.core.status import SampleStatus, ShardState
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import DatasetVersion, OnlineCheckpoint, Run, Sample, Shard
from difftpt_ops.db.tables import SampleError as SampleErrorRow
from difftpt_ops.db.writes import insert_many_ignore
from difftpt_ops.services.reading.reporting import report_progress_throttled
from difftpt_ops.services.running import checkpoints
from difftpt_ops.services.running.contexts import open_run_context
from difftpt_ops.services.running.finalize import finalize_run_if_complete
from difftpt_ops.services.running.leases import (
    HEARTBEATS,
    OWNED,
    Lease,
    WorkerIdentity,
    claim_row,
    claim_statements,
    release_shard,
)
from difftpt_ops.services.running.outcomes import Outcome, ShardOutcome, ShardTicket, retry_delay_s, stop_requested
from difftpt_ops.services.running.processors import QUEUE_OF_KIND, record_provenance

log = logging.getLogger(__name__)

_CONTEXT_CACHE_SIZE = 4

_S = Shard.__table__.c
_PREVIOUS = Shard.__table__.alias("previous")
_OPEN = [ShardState.PENDING.value, ShardState.QUEUED.value]
# The chain's gate: the first shard, or one whose predecessor is done.
_PREDECESSOR_DONE = (_S.index == 0) | exists(select(_PREVIOUS.c.id).where(
    _PREVIOUS.c.run_id == _S.run_id, _PREVIOUS.c.index == _S.index - 1,
    _PREVIOUS.c.state == ShardState.DONE.value))
_CLAIM = claim_statements((_S.run_id, _S.index, _S.start, _S.stop, _S.attempts), gate=_PREDECESSOR_DONE)
_DONE = update(Shard.__table__).where(OWNED).values(
    samples_done=bindparam("b_done"), samples_failed=bindparam("b_failed"), heartbeat_at=bindparam("b_now"),
    seconds=_S.seconds + bindparam("b_seconds"), state=ShardState.DONE.value, finished_at=bindparam("b_now"),
    error=None)


# --- Identity: which runs are online, their order ------------------------------------------------------------


def ensure_registered(method: str) -> None:
    """Load the method registry when `method` is not a built-in spec (it imports torch: only when needed)."""
    from difftpt_ops.core.method_specs import METHOD_SPECS

    if method not in METHOD_SPECS:
        import difftpt_ops.tta.methods  # noqa: F401 - registers every method's spec class


def is_online_method(name: str) -> bool:
    """True when `name` is a registered method of kind online."""
    from difftpt_ops.tta.methods import ONLINE, get_method, method_names

    return name in method_names() and get_method(name).kind == ONLINE


_chained: OrderedDict[tuple[str, int], bool] = OrderedDict()


def is_chained_shard(engine: Engine, shard_id: int) -> bool:
    """Whether a shard belongs to an online run (cached per process: a shard's run never changes)."""
    key = (str(engine.url), shard_id)
    if key not in _chained:
        with engine.connect() as connection:
            method = connection.execute(select(Run.method).join(Shard, Shard.run_id == Run.id)
                                        .where(Shard.id == shard_id)).scalar()
        _chained[key] = method is not None and method not in CORE_METHODS and is_online_method(method)
        while len(_chained) > 10_000:
            _chained.popitem(last=False)
    return _chained[key]


# --- Claiming a link of the chain -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainClaim:
    """A claimed shard of an online run; `token` (its attempt count) guards every later write."""

    shard_id: int
    run_id: int
    index: int
    start: int
    stop: int
    token: int
    worker: str | None = None  # the claimer's label, stored on the shard: part of what OWNED matches

    def params(self, **extra: Any) -> dict[str, Any]:
        return {"b_id": self.shard_id, "b_token": self.token, "b_worker": self.worker, **extra}


def claim_chained(engine: Engine, settings: Settings, shard_id: int, identity: WorkerIdentity) -> ChainClaim | None:
    """Take a shard of an online run if its predecessor is done, or take over one whose worker is gone."""
    row = claim_row(engine, settings, shard_id, identity, _CLAIM)
    return None if row is None else ChainClaim(shard_id, row.run_id, row.index, row.start, row.stop, row.attempts,
                                                worker=identity.label)


# --- Executing one link --------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What a process keeps per online run: the engine-side processor, the order, the store."""

    run_id: int
    version_id: int
    queue: str
    order: list[int]
    tune: Any  # services.running.processors.RunContext (its processor runs the method through the engine)
    recorder: _Recorder
    store: Any


class _Recorder:
    """Stands in for the engine's tuner inside the processor and keeps the last result (for its logits)."""

    def __init__(self, tuner: Any) -> None:
        self._tuner = tuner
        self.last: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tuner, name)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.last = self._tuner.run(*args, **kwargs)
        return self.last

    def run_features(self, *args: Any, **kwargs: Any) -> Any:
        self.last = self._tuner.run_features(*args, **kwargs)
        return self.last

    def start_stream(self, length: int) -> None:
        """Forget the state and say how long the stream is (a method's schedule may need it: OnZeta)."""
        self._tuner.stream_length = length
        self._tuner.reset_state()


_contexts: OrderedDict[tuple[str, int, str | None, str], _Context] = OrderedDict()
# Per engine tuner (tuners live in the model cache): the (database, run, shard index) whose end state it
# holds, when this process wrote that checkpoint itself; the next link then needs no read. Taken out when a
# link starts, so a link that fails half-way never leaves a stale claim behind.
_in_memory: weakref.WeakKeyDictionary[Any, tuple[str, int, int]] = weakref.WeakKeyDictionary()


def _context(engine: Engine, settings: Settings, run_id: int, *, device: str | None, worker: str) -> _Context:
    key = (str(engine.url), run_id, device, worker)
    tune = open_run_context(engine, settings, run_id, device=device, worker=worker)  # cached there
    if key not in _contexts or _contexts[key].tune is not tune:
        with session_scope(engine) as session:
            spec, n_samples = session.execute(
                select(Run.spec, DatasetVersion.num_samples).join(DatasetVersion, DatasetVersion.id ==
                                                                  Run.dataset_version_id).where(Run.id == run_id)).one()
        processor = tune.processor
        recorder = processor.tuner if isinstance(processor.tuner, _Recorder) else _Recorder(processor.tuner)
        processor.tuner = recorder
        order = stream_order(int(n_samples), int(spec["method"].get("order_seed", 0)))
        _contexts[key] = _Context(run_id, tune.dataset_version_id, tune.queue, order, tune, recorder,
                                  checkpoints.checkpoint_store(settings))
        while len(_contexts) > _CONTEXT_CACHE_SIZE:
            _contexts.popitem(last=False)
    return _contexts[key]


@dataclass
class _Results:
    """A shard's rows and logits, written only when the whole shard is done."""

    rows: list[Any] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    logits: list[Any] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seconds: float = 0.0
    # A method that predicts in blocks (OGA's batches): per sample of the open block, the index of its row
    # (None: it failed after its step), whose provisional prediction the block's end replaces.
    held: list[int | None] = field(default_factory=list)

    def add_error(self, run_id: int, sample_id: int, sample_index: int, exc: Exception) -> None:
        self.errors.append({"run_id": run_id, "sample_id": sample_id, "sample_index": sample_index,
                            "error": str(exc)[:4000], "created_at": utcnow()})

    def written(self) -> tuple[list[Any], list[Any], list[int]]:
        """The rows, logits and positions to write (without rows a block's end turned into errors)."""
        kept = [i for i, row in enumerate(self.rows) if row is not None]
        return [self.rows[i] for i in kept], [self.logits[i] for i in kept], [self.positions[i] for i in kept]


def _samples_at(engine: Engine, context: _Context, start: int, stop: int) -> list[tuple[int, Any]]:
    """(position, sample row) for the stream positions [start, stop), in stream order."""
    wanted = context.order[start:stop]
    c = Sample.__table__.c
    with engine.connect() as connection:
        rows = connection.execute(select(c.id, c.index, c.relpath, c.label, c.content_hash, c.status, c.error)
                                  .where(c.dataset_version_id == context.version_id, c.index.in_(wanted))).all()
    by_index = {row.index: row for row in rows}
    return [(start + offset, by_index[index]) for offset, index in enumerate(wanted)]


def _advance(context: _Context, position: int, sample: Any, results: _Results, run_id: int) -> bool:
    """Run the method on one sample (updating its state); record the outcome in `results`."""
    started = time.perf_counter()
    held = context.recorder.held
    try:
        if sample.status == SampleStatus.FAILED:
            raise SampleError(sample.error or "sample failed at registration")
        row = context.tune.processor.process(sample)
        ok = True
    except SampleError as exc:
        # Unreadable: the state never saw this sample. Non-finite outcome: the method's step already updated the
        # state (as the reference's would; docs/methods.md, "Failed samples"). Every replay does the same.
        ok = False
        results.add_error(run_id, sample.id, sample.index, exc)
    results.seconds += time.perf_counter() - started
    if ok:
        results.rows.append(row)
        results.logits.append(context.recorder.last.logits.detach().float().cpu())
        results.positions.append(position)
    if context.recorder.held > held:  # its step ran; its prediction waits for the end of its block
        results.held.append(len(results.rows) - 1 if ok else None)
    return ok


def _close_block_at(context: _Context, position: int, stop: int, results: _Results, run_id: int) -> None:
    """After the sample at `position`: if a block ends there (a multiple of the method's block size, or `stop`,
    the end of the range being run), its samples' provisional predictions become their final ones, each from
    the state after the whole block. Shards and --limit end on block boundaries (`submit_checks`), so a block
    never spans two shards."""
    tuner = context.recorder
    if tuner.block == 1 or ((position + 1) % tuner.block and position + 1 != stop):
        return
    for index, logits in zip(results.held, tuner.close_block(), strict=True):
        if index is None:
            continue
        prediction = results.rows[index][0]
        try:
            results.rows[index] = context.tune.processor.revise(results.rows[index], logits)
            results.logits[index] = logits.detach().float().cpu()
        except SampleError as exc:
            results.add_error(run_id, prediction["sample_id"], prediction["sample_index"], exc)
            results.rows[index] = None
    results.held.clear()


def _start_state(engine: Engine, settings: Settings, context: _Context, claim: ChainClaim) -> None:
    """Put the method's state where the chain stands before this shard: the newest intact checkpoint,
    then a replay of the shards after it (rewriting their files when they were damaged)."""
    tuner = context.recorder
    if _in_memory.pop(tuner._tuner, None) == (str(engine.url), claim.run_id, claim.index - 1):  # noqa: SLF001
        return  # this process finished the previous link: its state is that checkpoint's
    with session_scope(engine) as session:
        rows = session.scalars(select(OnlineCheckpoint).where(
            OnlineCheckpoint.run_id == claim.run_id, OnlineCheckpoint.shard_index < claim.index)
            .order_by(OnlineCheckpoint.shard_index.desc())).all()
        shards = session.execute(select(Shard.index, Shard.start, Shard.stop).where(
            Shard.run_id == claim.run_id, Shard.index < claim.index).order_by(Shard.index)).all()
        session.expunge_all()
    base, position = -1, 0
    tuner.start_stream(len(context.order))  # the whole stream: a --limit run is the start of the full one
    for row in rows:
        data = checkpoints.read_checkpoint(context.store, row)
        if data is not None:
            state, _, _ = checkpoints.decode_checkpoint(data)
            tuner.load_state_dict(state)
            base, position = row.shard_index, row.position
            break
    damaged = {row.shard_index: row for row in rows if row.shard_index > base}
    for index, start, stop in shards:
        if index <= base:
            continue
        log.warning("run %s: replaying shard %s to rebuild the state for shard %s", claim.run_id, index, claim.index)
        replay = _Results()
        for at, sample in _samples_at(engine, context, max(start, position), stop):
            _advance(context, at, sample, replay, claim.run_id)
            _close_block_at(context, at, stop, replay, claim.run_id)
        if index in damaged:
            _rewrite(context, damaged[index], replay)


def _rewrite(context: _Context, row: Any, replay: _Results) -> None:
    import torch

    _, logits, positions = replay.written()
    data = checkpoints.encode_checkpoint(context.recorder.state_dict(), _stack(logits),
                                         torch.tensor(positions, dtype=torch.int64))
    facts = checkpoints.put_checkpoint(context.store, data)
    if facts["content_hash"] != row.content_hash:
        log.warning("replayed shard %s of run %s gives a different state than its checkpoint row records",
                    row.shard_index, row.run_id)


def _stack(logits: list[Any]) -> Any:
    import torch

    return torch.stack(logits) if logits else torch.zeros(0, 0)


def _finish(engine: Engine, context: _Context, claim: ChainClaim, results: _Results) -> bool:
    """Checkpoint file first, then the shard's rows, the checkpoint row and `done` in one transaction.
    False when the shard is no longer ours (the transaction is rolled back)."""
    import torch

    rows, logits, positions = results.written()
    data = checkpoints.encode_checkpoint(context.recorder.state_dict(), _stack(logits),
                                         torch.tensor(positions, dtype=torch.int64))
    facts = checkpoints.put_checkpoint(context.store, data)
    now = utcnow()
    checkpoint = {"run_id": claim.run_id, "shard_index": claim.index, "position": claim.stop, **facts,
                  "created_at": now}
    params = claim.params(b_done=len(rows), b_failed=len(results.errors), b_now=now,
                          b_seconds=results.seconds)
    with engine.connect() as connection, connection.begin() as transaction:
        context.tune.processor.write(connection, rows)
        insert_many_ignore(connection, SampleErrorRow, results.errors)
        insert_many_ignore(connection, OnlineCheckpoint, [checkpoint])
        if connection.execute(_DONE, params).rowcount != 1:
            transaction.rollback()
            return False
    return True


def _process(engine: Engine, settings: Settings, claim: ChainClaim, context: _Context, lease: Lease,
             progress: Any) -> str:
    """Run one claimed link; returns the outcome's name (done / interrupted / lost)."""
    # 1. The state as the chain left it before this shard.
    _start_state(engine, settings, context, claim)
    # 2. The shard's samples in stream order; nothing is written until the last one.
    results = _Results()
    for position, sample in _samples_at(engine, context, claim.start, claim.stop):
        if stop_requested() or lease.lost.is_set():
            return "lost" if lease.lost.is_set() else "interrupted"
        ok = _advance(context, position, sample, results, claim.run_id)
        _close_block_at(context, position, claim.stop, results, claim.run_id)
        if progress is not None:
            progress(int(ok), int(not ok))
    # 3. File, then rows + checkpoint row + done, atomically.
    if not _finish(engine, context, claim, results):
        return "lost"
    _in_memory[context.recorder._tuner] = (str(engine.url), claim.run_id, claim.index)  # noqa: SLF001
    report_progress_throttled(engine, settings, claim.run_id)
    return "done"


def execute_online_shard(engine: Engine, settings: Settings, shard_id: int, *, identity: WorkerIdentity,
                         device: str | None = None, progress: Any = None) -> ShardOutcome:
    """Run one shard of an online run (see the module docstring); returns what `shards.execute_shard` returns."""
    claim = claim_chained(engine, settings, shard_id, identity)
    if claim is None:
        return ShardOutcome(shard_id, Outcome.SKIPPED)
    lease = Lease(engine, claim.shard_id, claim.token, settings.heartbeat_interval_s, worker=claim.worker)
    HEARTBEATS.hold(lease)
    # Online runs are tuning runs: the queue is known even when the context fails to open (a model that does
    # not load), so a retry is sent again rather than lost.
    queue: str = QUEUE_OF_KIND["tune"]
    try:
        context = _context(engine, settings, claim.run_id, device=device, worker=identity.label)
        record_provenance(engine, claim, context.tune)  # as an episodic shard: `runs show` reads it
        result = _process(engine, settings, claim, context, lease, progress)
    except KeyboardInterrupt:
        release_shard(engine, claim, ShardState.PENDING)
        raise
    except TransientError:
        raise
    except SQLAlchemyError as exc:
        raise TransientError(f"shard {shard_id}: database error ({exc.__class__.__name__}: {exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a shard failing as a whole is recorded, not raised
        return _record_failure(engine, settings, claim, queue, exc)
    finally:
        HEARTBEATS.release(lease)
    if result == "interrupted":
        release_shard(engine, claim, ShardState.QUEUED)
        return ShardOutcome(shard_id, Outcome.INTERRUPTED, queue)
    if result == "lost":
        return ShardOutcome(shard_id, Outcome.LOST, queue)
    finalize_run_if_complete(engine, settings, claim.run_id)
    follow_up = _next_link(engine, claim, queue)
    return ShardOutcome(shard_id, Outcome.DONE, queue, processed=claim.stop - claim.start, follow_up=follow_up)


def _next_link(engine: Engine, claim: ChainClaim, queue: str) -> tuple[ShardTicket, ...]:
    """Mark the next shard of the chain queued; its ticket, for the caller to send after this commit."""
    with engine.begin() as connection:
        return _queue_link(connection, claim.run_id, claim.index + 1, queue)


def _queue_link(connection: Any, run_id: int, index: int, queue: str) -> tuple[ShardTicket, ...]:
    """Mark a run's link `index` queued if it is open; its ticket (none when it is not open)."""
    next_id = connection.execute(update(Shard.__table__).where(
        _S.run_id == run_id, _S.index == index, _S.state.in_(_OPEN))
        .values(state=ShardState.QUEUED.value).returning(_S.id)).scalar()
    return (ShardTicket(int(next_id), queue),) if next_id is not None else ()


def reissue_next_link(engine: Engine, shard_id: int) -> tuple[ShardTicket, ...]:
    """For a link that is already done: the next link's ticket (marked queued) when that link is still open.

    A worker that dies after a link's commit and before sending the next link's message leaves that link
    queued (or pending) with no message; RabbitMQ has no lost-message check to notice. The broker redelivers
    the done link's message (it was never acknowledged), and its worker, which skips the link, calls this.
    A message sent twice is harmless: claims are conditional."""
    if not is_chained_shard(engine, shard_id):
        return ()
    with engine.begin() as connection:
        link = connection.execute(select(_S.run_id, _S.index, _S.state).where(_S.id == shard_id)).one_or_none()
        if link is None or link.state != ShardState.DONE.value:
            return ()
        return _queue_link(connection, link.run_id, link.index + 1, QUEUE_OF_KIND["tune"])


def fail_rest_of_chain(connection: Any, run_id: int, index: int) -> None:
    """The open shards after a failed link of an online run fail too: their gate (the previous shard done) can
    never open, so a delivery would only be skipped, and the run would never end. `resume` reopens them all."""
    connection.execute(update(Shard.__table__).where(
        _S.run_id == run_id, _S.index > index, _S.state.in_(_OPEN)).values(
        state=ShardState.FAILED.value, finished_at=utcnow(),
        error=f"shard {index} of this online run failed; `resume` runs the chain on from there"))


def _record_failure(engine: Engine, settings: Settings, claim: ChainClaim, queue: str | None,
                    exc: Exception) -> ShardOutcome:
    """Retry later, or fail the shard and the rest of the chain (which cannot run without it)."""
    retry = not isinstance(exc, InputError) and claim.token < settings.shard_max_attempts
    error = "".join(traceback.format_exception(exc))[-8000:]
    state = ShardState.QUEUED if retry else ShardState.FAILED
    with engine.begin() as connection:
        connection.execute(update(Shard.__table__).where(OWNED).values(
            state=state.value, error=error, **({} if retry else {"finished_at": utcnow()})), claim.params())
        if not retry:
            fail_rest_of_chain(connection, claim.run_id, claim.index)
    log.warning("online shard %s attempt %s failed: %s", claim.shard_id, claim.token, exc)
    if retry:
        return ShardOutcome(claim.shard_id, Outcome.RETRY, queue, retry_in_s=retry_delay_s(claim.token), error=exc)
    finalize_run_if_complete(engine, settings, claim.run_id)
    return ShardOutcome(claim.shard_id, Outcome.FAILED, queue, error=exc)
