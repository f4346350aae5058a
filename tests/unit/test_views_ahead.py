"""ViewsAhead: the next sample prepared in a second thread while the current one runs, errors kept in order."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from difftpt_ops.core.errors import NotReadyError, SampleError
from difftpt_ops.services.running.views_ahead import ViewsAhead, builds_views_ahead, views_ahead_for

pytestmark = pytest.mark.unit

WAIT_S = 10.0


def _samples(n: int, failed: tuple[int, ...] = ()) -> list[SimpleNamespace]:
    return [SimpleNamespace(index=i, status="failed" if i in failed else "ok") for i in range(n)]


class _Recorder:
    """A processor whose `process(i)` waits until `prepare(i + 1)` has started: it can only finish when the
    next sample is prepared during it, in another thread."""

    views_ahead = True

    def __init__(self, samples: list[SimpleNamespace], *, last: int, fail: dict[int, Exception] | None = None):
        self.started = {s.index: threading.Event() for s in samples}
        self.last, self.fail = last, fail or {}
        self.prepared: list[int] = []
        self.threads: set[str] = set()

    def prepare(self, sample: Any) -> str:
        self.threads.add(threading.current_thread().name)
        self.prepared.append(sample.index)
        self.started[sample.index].set()
        if sample.index in self.fail:
            raise self.fail[sample.index]
        return f"views of {sample.index}"

    def process(self, sample: Any, prepared: str) -> tuple[int, str]:
        following = sample.index + 1
        if following <= self.last and following not in self.fail:
            assert self.started[following].wait(WAIT_S), f"sample {following} was not prepared during {sample.index}"
        return sample.index, prepared


def test_the_next_sample_is_prepared_in_another_thread_during_this_one() -> None:
    samples = _samples(4)
    recorder = _Recorder(samples, last=3)
    with ViewsAhead(recorder, samples) as ahead:
        rows = [ahead.process(i) for i in range(4)]
    assert rows == [(i, f"views of {i}") for i in range(4)]
    assert recorder.prepared == [0, 1, 2, 3]  # each sample once, in order
    assert recorder.threads and all(name.startswith("views-ahead") for name in recorder.threads)
    assert threading.current_thread().name not in recorder.threads


def test_a_prepare_error_is_raised_where_its_sample_is_processed() -> None:
    samples = _samples(5)
    recorder = _Recorder(samples, last=4, fail={1: SampleError("sample 1: unreadable"), 3: NotReadyError("wait")})
    outcomes: list[Any] = []
    with ViewsAhead(recorder, samples) as ahead:
        for i in range(5):
            try:
                outcomes.append(ahead.process(i))
            except (SampleError, NotReadyError) as exc:
                outcomes.append(type(exc).__name__)
    assert outcomes == [(0, "views of 0"), "SampleError", (2, "views of 2"), "NotReadyError", (4, "views of 4")]


def test_samples_failed_at_registration_are_never_prepared() -> None:
    samples = _samples(4, failed=(1,))
    recorder = _Recorder(samples, last=3, fail={})
    recorder.last = 0  # sample 0 cannot wait for sample 1, which is never prepared
    with ViewsAhead(recorder, samples) as ahead:
        first = ahead.process(0)
        # the shard loop records sample 1 without a model; then:
        recorder.last = 3
        rest = [ahead.process(i) for i in (2, 3)]
    assert first == (0, "views of 0") and [r[0] for r in rest] == [2, 3]
    assert 1 not in recorder.prepared


def test_only_processors_that_ask_for_it_prepare_ahead() -> None:
    samples = _samples(3)
    assert views_ahead_for(SimpleNamespace(views_ahead=False, prepare=print), samples) is None
    assert views_ahead_for(SimpleNamespace(process=print), samples) is None  # no prepare (generation, noop)
    assert views_ahead_for(SimpleNamespace(views_ahead=True, prepare=print), samples[:1]) is None  # nothing ahead
    ahead = views_ahead_for(SimpleNamespace(views_ahead=True, prepare=print), samples)
    assert isinstance(ahead, ViewsAhead)
    ahead.close()


def test_auto_prepares_ahead_on_cuda_only() -> None:
    assert [builds_views_ahead("auto", d) for d in ("cuda", "cuda:1", "cpu", "mps")] == [True, True, False, False]
    assert builds_views_ahead("on", "cpu") and not builds_views_ahead("off", "cuda:0")


def test_a_sample_is_not_prepared_ahead_during_its_twin() -> None:
    """The same content twice in a row: the second is prepared only after the first was processed (it reads
    what the first stored in the feature store, as in one thread); other samples are prepared ahead."""
    samples = [SimpleNamespace(index=i, status="ok", content_hash=h) for i, h in enumerate("abbc")]
    prepared_during: dict[int, list[int]] = {}

    class Processor:
        views_ahead = True

        def prepare(self, sample: Any) -> int:
            return sample.index

        def process(self, sample: Any, prepared: int) -> int:
            prepared_during[sample.index] = sorted(ahead._pending)
            if sample.index + 1 in ahead._pending:
                ahead._pending[sample.index + 1].result(WAIT_S)
            return prepared

    with ViewsAhead(Processor(), samples) as ahead:
        assert [ahead.process(i) for i in range(4)] == [0, 1, 2, 3]
    assert prepared_during == {0: [1], 1: [], 2: [3], 3: []}
