"""Building the next sample's views while the current sample runs (Settings.views_ahead).

A tuning sample's work has two parts: reading its files and stored features and building its views on the CPU
(`TuneProcessor.prepare`), then the model (`process`). On a GPU the first part is about 40% of a TPT sample's time
and leaves the GPU idle (bench/tta_breakdown.py); one worker thread doing it for sample i+1 while sample i runs
overlaps the two. Results do not change: each sample's views depend only on the sample and the run's seed.

Errors stay with their sample: a sample's `prepare` error (an unreadable image, generated images not there yet)
is raised when that sample is processed, in stream order, exactly where processing it in one thread raises it.

A sample whose content hash is the one being processed (the same image twice in a row) is not prepared ahead:
one thread reads back the feature set its twin has just stored, and so must this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from difftpt_ops.core.status import SampleStatus


class ViewsAhead:
    """Processes a shard's samples in order, each one's `prepare` done in a worker thread one sample ahead."""

    def __init__(self, processor: Any, samples: Sequence[Any]) -> None:
        self.processor, self.samples = processor, samples
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="views-ahead")
        self._pending: dict[int, Future[Any]] = {}

    def process(self, position: int) -> Any:
        """The rows of `samples[position]`; starts preparing the next sample before running this one."""
        sample = self.samples[position]
        future = self._pending.pop(position, None) or self._submit(position)
        prepared = future.result()  # re-raises this sample's own prepare error, here
        if not _same_content(sample, self.samples[position + 1] if position + 1 < len(self.samples) else None):
            self._start(position + 1)  # (a twin is prepared after this one has stored its features)
        return self.processor.process(sample, prepared)

    def close(self) -> None:
        """Drop what was prepared ahead (a stopped shard) and wait for the thread (at most one sample's views)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ViewsAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, position: int) -> None:
        # Samples that failed at registration are never prepared (the loop records them without a model).
        if position < len(self.samples) and self.samples[position].status != SampleStatus.FAILED:
            self._pending[position] = self._submit(position)

    def _submit(self, position: int) -> Future[Any]:
        prepare: Callable[[Any], Any] = self.processor.prepare
        return self._pool.submit(prepare, self.samples[position])


def _same_content(sample: Any, following: Any) -> bool:
    """Whether `following` is the same registered content as `sample` (both hashed, equal hashes)."""
    digest = getattr(sample, "content_hash", None)
    return following is not None and bool(digest) and getattr(following, "content_hash", None) == digest


def builds_views_ahead(setting: str, device: str) -> bool:
    """Whether a tuning run on `device` prepares ahead under Settings.views_ahead: on, off, or auto (on CUDA,
    where the GPU would wait for the CPU; a CPU's cores are busy with the model already)."""
    return setting == "on" or (setting == "auto" and device.startswith("cuda"))


def views_ahead_for(processor: Any, samples: Sequence[Any]) -> ViewsAhead | None:
    """A ViewsAhead for a processor that prepares ahead (`views_ahead` set), else None (one thread)."""
    if getattr(processor, "views_ahead", False) and hasattr(processor, "prepare") and len(samples) > 1:
        return ViewsAhead(processor, samples)
    return None
