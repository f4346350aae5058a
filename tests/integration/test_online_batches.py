"""Online runs of a method that predicts its stream in batches (OGA, whose reference feeds batches of 32): the
stored predictions are the batch's, shards and --limit runs end on batch boundaries, and bad sizes are refused
before anything is written (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from difftpt_ops.core.errors import InputError
from difftpt_ops.core.method_specs import method_spec_from_dict
from difftpt_ops.core.specs import ModelSpec
from difftpt_ops.data.images import load_rgb
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Dataset, Prediction, Run, Shard, Sweep
from difftpt_ops.models.clip import load_clip
from difftpt_ops.services.running import contexts, estimate, online, runs, sweeps
from difftpt_ops.tta import prepare_classifier
from tests.integration.test_online_support import (
    N_SAMPLES,
    assert_same_run,
    image_dataset,
    online_settings,
    predictions,
    stored_logits,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def _submit(engine, settings, clip: Path, *, batch_size: int = 4, shard_size: int | None = 8,  # type: ignore[no-untyped-def]
            **kwargs):
    return runs.submit_tune(engine, settings, dataset_ref="pics", method="oga", model=str(clip), pretrained=None,
                            shard_size=shard_size, overrides={"batch_size": str(batch_size)}, **kwargs)


def _engine_loop(engine, run_id: int, clip_dir: Path, images: Path) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The run's spec through the engine directly, in its stream order: per sample a step, and at the end of each
    batch and of the stream the batch's final predictions. (final, provisional) logits by stream position."""
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        spec = method_spec_from_dict(run.spec["method"])
        names = session.scalars(select(Dataset.class_names)).one()
    tuner = prepare_classifier(load_clip(ModelSpec(name=str(clip_dir), pretrained=None)), names, spec)
    final: list[torch.Tensor] = []
    provisional = []
    for position, index in enumerate(online.stream_order(N_SAMPLES, 0)):
        image = load_rgb(images / f"class{index % 3}/{index}.png")
        provisional.append(tuner.run(image, seed=0, sample_key=index).logits)
        if (position + 1) % spec.batch_size == 0 or position + 1 == N_SAMPLES:
            final += tuner.close_block()
    return torch.stack(final), torch.stack(provisional)


def test_each_batch_is_predicted_with_the_state_after_it(workspace: Path, database_url: str, tmp_path: Path,
                                                         tiny_models_dir: Path) -> None:
    """Batches of 4 in shards of 8 (the last batch, of 2, ends the stream): the stored logits and rows are the
    engine's final predictions of each batch, not the provisional ones its steps gave."""
    settings, engine = online_settings(workspace, database_url)
    image_dataset(engine, tmp_path / "images")
    result = _submit(engine, settings, tiny_models_dir / "clip")
    assert (result.state, result.shards_total) == ("finished", 3)
    final, provisional = _engine_loop(engine, result.run_id, tiny_models_dir / "clip", tmp_path / "images")
    assert float((final - provisional).abs().max()) > 1e-3  # the batches change the numbers this test compares
    logits = stored_logits(engine, settings, result.run_id)
    got = torch.stack([logits[position] for position in range(N_SAMPLES)])
    torch.testing.assert_close(got, final.float(), rtol=0, atol=1e-5)
    order = online.stream_order(N_SAMPLES, 0)
    with session_scope(engine) as session:
        rows = {row.sample_index: row for row in session.scalars(
            select(Prediction).where(Prediction.run_id == result.run_id))}
    for position, index in enumerate(order):
        row, expected = rows[index], final[position]
        assert row.pred == int(expected.argmax()) and row.correct == (row.pred == row.label)
        assert row.top5 == torch.topk(expected, k=3).indices.tolist()
        assert row.confidence_after == pytest.approx(float(expected.softmax(-1).max()), abs=1e-5)
        assert row.zeroshot_pred is not None and row.entropy_before is not None


def test_a_limit_run_continued_is_the_full_run(workspace: Path, database_url: str, tmp_path: Path,
                                               tiny_models_dir: Path) -> None:
    """--limit 8 (two batches), then the rest: the same predictions and logits as one uninterrupted run, whose
    default shard size (online_shard_size 6) was rounded up to a multiple of the batch (8)."""
    settings, engine = online_settings(workspace, database_url, online_shard_size="6")
    image_dataset(engine, tmp_path / "images")
    first = _submit(engine, settings, tiny_models_dir / "clip", limit=8)
    assert first.state == "finished"
    rest = _submit(engine, settings, tiny_models_dir / "clip")
    assert (rest.run_id, rest.state) == (first.run_id, "finished")
    ref_settings, ref_engine = online_settings(tmp_path / "ref", f"sqlite:///{tmp_path / 'ref.db'}",
                                               online_shard_size="6")
    image_dataset(ref_engine, tmp_path / "ref-images")
    contexts.clear_caches()
    reference = _submit(ref_engine, ref_settings, tiny_models_dir / "clip", shard_size=None)
    with session_scope(ref_engine) as session:
        assert session.get(Run, reference.run_id).shard_size == 8
    assert_same_run(engine, settings, first.run_id, ref_engine, ref_settings, reference.run_id)


def _counts(engine) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        return tuple(connection.scalar(select(func.count()).select_from(table))  # type: ignore[return-value]
                     for table in (Run, Shard, Sweep))


@pytest.mark.parametrize(("option", "value", "kwargs"), [
    ("--shard-size", 6, {"shard_size": 6}),
    ("--limit", 6, {"limit": 6}),
])
def test_a_shard_or_limit_that_splits_a_batch_is_refused(workspace: Path, database_url: str, tmp_path: Path,
                                                         tiny_models_dir: Path, option: str, value: int,
                                                         kwargs: dict[str, int]) -> None:
    settings, engine = online_settings(workspace, database_url)
    image_dataset(engine, tmp_path / "images")
    before = _counts(engine)
    with pytest.raises(InputError) as raised:
        _submit(engine, settings, tiny_models_dir / "clip", **{"shard_size": 8, **kwargs})
    assert raised.value.argument == option and raised.value.value == value
    assert "batches of 4" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(InputError) as raised:  # a sweep: refused before its first point, for any of them
        sweeps.submit_sweep(engine, settings, dataset_ref="pics", method="oga", grid={"batch_size": ["2", "4"]},
                            seeds=[0], model=str(tiny_models_dir / "clip"), pretrained=None,
                            **{"shard_size": 8, **kwargs})
    assert raised.value.argument == option
    with pytest.raises(InputError) as raised:  # and a dry run refuses what the submit would
        estimate.estimate_tune(engine, settings, dataset_ref="pics", method="oga", model=str(tiny_models_dir / "clip"),
                               pretrained=None, generation_id=None, overrides={"batch_size": "4"}, seed=0,
                               **{"limit": None, "shard_size": 8, **kwargs})
    assert raised.value.argument == option
    assert _counts(engine) == before
    # A limit past the end of the stream is the whole stream: nothing to split.
    whole = _submit(engine, settings, tiny_models_dir / "clip", limit=100)
    assert whole.state == "finished" and len(predictions(engine, whole.run_id)) == N_SAMPLES
