"""RLCF runs through the services: the reward model folder is checked at submit before anything is written, stored
in the spec by its absolute path, loaded next to the run's CLIP, and its weights' sha256 is in every shard's
provenance (a run refuses to go on with other weights in that folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from cli.main import app
from difftpt_ops.core.errors import InputError
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Prediction, Run, Shard
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.running import runs
from difftpt_ops.services.running.status import show_run
from tests.integration.test_jobs_support import (
    add_dataset,
    make_settings,
    open_engine,
    quiet_run_machinery,
    write_pngs,
)

pytestmark = pytest.mark.integration

SMALL = {"n_views": "8", "selection_p": "0.25", "steps": "1"}


def _runs(engine) -> int:  # type: ignore[no-untyped-def]
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Run)) or 0)


def _weights_of(folder: Path) -> str:
    from difftpt_ops.core.specs import ModelSpec
    from difftpt_ops.models.clip import load_clip
    from difftpt_ops.storage.features import clip_weights_digest, image_tower, weights_digest

    model = load_clip(ModelSpec(name=str(folder), pretrained=None), "cpu").model
    return clip_weights_digest(model, weights_digest(image_tower(model)))


@pytest.fixture
def setup(cli_env: dict[str, str], workspace: Path, database_url: str, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from difftpt_ops.models.tiny_clip import make_tiny_clip

    quiet_run_machinery(monkeypatch)
    settings = make_settings(workspace, database_url, device="cpu")
    engine = open_engine(settings)
    root = tmp_path / "images"
    add_dataset(engine, "pics", 3, root=root, classes=4, relpaths=write_pngs(root, 3, classes=4))
    policy = make_tiny_clip(tmp_path / "policy", seed=1)
    reward = make_tiny_clip(tmp_path / "reward", seed=2, embed_dim=48, image_size=256)
    return settings, engine, policy, reward


def test_a_missing_or_unreadable_reward_model_is_refused_before_anything_is_written(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, engine, policy, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    tune = ("submit", "tune", "--dataset", "pics", "--method", "rlcf", "--model", str(policy), "--device", "cpu")
    for value, reason in ((str(tmp_path / "nowhere"), "no such directory"),
                          (str(empty), "open_clip_config.json"),
                          ("ViT-L-14", "no such directory")):
        for extra in ((), ("--dry-run",), ("--seeds", "0,1")):
            result = CliRunner().invoke(app, [*tune, "--set", f"reward_model={value}", *extra])
            out = result.output.strip()
            assert result.exit_code == 2, out
            assert "--set reward_model" in out and value in out and reason in out, out
            assert len(out.splitlines()) == 1, out
    result = CliRunner().invoke(app, list(tune))
    assert result.exit_code == 2 and "--set reward_model" in result.output and "ViT-L/14" in result.output
    with pytest.raises(InputError, match="reward_model"):
        runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                         overrides={**SMALL, "reward_model": str(tmp_path / "nowhere")})
    assert _runs(engine) == 0


def test_sample_k_above_the_class_count_is_refused_before_anything_is_written(setup) -> None:  # type: ignore[no-untyped-def]
    """QA: `--set sample_k=20` on an 8-class dataset made a run whose shard failed ("exceeds the 8 classes"), exit 2
    with the run left failed (and, with a broker, "enqueued" and exit 0); `--sweep sample_k=2,20` recorded the
    sweep and its first run before the second point failed. Refused at submit, dry run and sweep alike."""
    from difftpt_ops.db.tables import Sweep

    _, engine, policy, reward = setup
    tune = ("submit", "tune", "--dataset", "pics", "--method", "rlcf", "--model", str(policy), "--device", "cpu",
            "--set", f"reward_model={reward}", *(f"--set={k}={v}" for k, v in SMALL.items()))
    for extra, named in ((("--set", "sample_k=5"), "--set sample_k=5"),
                         (("--set", "sample_k=5", "--dry-run"), "--set sample_k=5"),
                         (("--sweep", "sample_k=2,5"), "--sweep sample_k=5"),
                         (("--set", "sample_k=5", "--seeds", "0,1"), "--set sample_k=5")):
        result = CliRunner().invoke(app, [*tune, *extra])
        out = result.output.strip()
        assert result.exit_code == 2, out
        assert out.splitlines() == [f"error: {named}: exceeds the dataset's 4 classes"], out
    assert _runs(engine) == 0
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Sweep)) == 0
        assert session.scalar(select(func.count()).select_from(Shard)) == 0
    result = CliRunner().invoke(app, [*tune, "--set", "sample_k=4", "--limit", "1"])  # every class: allowed
    assert result.exit_code == 0, result.output
    assert _runs(engine) == 1


def test_a_reward_model_a_worker_cannot_load_is_named_as_the_reward_model(setup, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """QA: with a broker, submit does not check the reward folder (workers check their own), and a worker that could
    not load it failed the shard with "--model=/nope: is neither an open_clip model name nor an existing directory":
    the run's --model was fine. The run (here executed in-process with the submit check skipped, as a worker sees
    it) fails naming --set reward_model."""
    settings, engine, policy, _ = setup
    monkeypatch.setattr(runs, "check_method_files", lambda *_: None)  # what a submit with a broker leaves to workers
    missing = str(tmp_path / "nowhere")
    with pytest.raises(InputError) as raised:
        runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                         overrides={**SMALL, "reward_model": missing})
    assert (raised.value.argument, raised.value.value) == ("--set reward_model", missing)
    with session_scope(engine) as session:
        [run] = session.scalars(select(Run)).all()
        assert run.state == "failed" and run.error.startswith(f"--set reward_model={missing}: "), run.error


def test_a_run_records_its_reward_model_and_refuses_changed_weights(setup, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from difftpt_ops.models.tiny_clip import make_tiny_clip
    from difftpt_ops.services.running.contexts import clear_caches

    settings, engine, policy, reward = setup
    monkeypatch.chdir(reward.parent)
    first = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                             overrides={**SMALL, "reward_model": "reward"}, limit=2, shard_size=1)
    assert first.state == "finished"
    shown = show_run(engine, first.run_id)
    assert shown["spec"]["method"]["reward_model"] == str(reward.resolve())  # relative: stored absolute
    [group] = shown["shard_provenance"]
    assert group["reward_weights"] == _weights_of(reward) and group["weights"] == _weights_of(policy)
    assert group["reward_weights"] != group["weights"]
    with session_scope(engine) as session:
        recorded = [p["reward_weights"] for p in session.scalars(select(Shard.provenance).where(
            Shard.run_id == first.run_id, Shard.provenance.is_not(None)))]
    assert recorded == [group["reward_weights"]] * 2
    with session_scope(engine) as session:
        run = session.get(Run, first.run_id)
        session.expunge(run)
    assert reporting.provenance_tags(engine, run)["worker.reward_weights"] == group["reward_weights"]

    make_tiny_clip(reward, seed=3, embed_dim=48, image_size=256)  # the same folder, other weights
    clear_caches()
    with pytest.raises(InputError, match="--set reward_model.*weights changed"):
        runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                         overrides={**SMALL, "reward_model": str(reward)}, limit=3, shard_size=1)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)
                              .where(Prediction.run_id == first.run_id)) == 2


def test_seeds_give_reproducible_rlcf_runs(setup) -> None:  # type: ignore[no-untyped-def]
    """`--seeds` is allowed (the crops are random); the same seed gives the same predictions in a new run."""
    from difftpt_ops.services.running.contexts import clear_caches

    settings, engine, policy, reward = setup
    overrides = {**SMALL, "reward_model": str(reward), "sampling": "multinomial"}
    a = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                         overrides=overrides, seed=4, shard_size=3)
    b = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                         overrides={**overrides, "features": "recompute"}, seed=4, shard_size=3)
    clear_caches()
    assert a.run_id != b.run_id and a.state == b.state == "finished"
    with session_scope(engine) as session:
        rows = {run: [tuple(r) for r in session.execute(select(Prediction.sample_index, Prediction.pred,
                                                                Prediction.top5, Prediction.entropy_after)
                                                        .where(Prediction.run_id == run)
                                                        .order_by(Prediction.sample_index))]
                for run in (a.run_id, b.run_id)}
    assert [r[:3] for r in rows[a.run_id]] == [r[:3] for r in rows[b.run_id]]
    assert [r[3] for r in rows[a.run_id]] == pytest.approx([r[3] for r in rows[b.run_id]], abs=1e-4)


def _predictions(engine, run_id: int) -> list[tuple]:  # type: ignore[no-untyped-def]
    with session_scope(engine) as session:
        return [tuple(r) for r in session.execute(select(Prediction.sample_index, Prediction.pred, Prediction.top5,
                                                         Prediction.entropy_after)
                                                  .where(Prediction.run_id == run_id)
                                                  .order_by(Prediction.sample_index))]


def test_reward_features_are_stored_and_a_stored_sample_builds_no_view(setup, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The reward CLIP's features of the kept views go to the store under its own fingerprint; a later run whose
    views and kept views are stored for both models builds no view, and predicts as a run that encodes all."""
    from difftpt_ops.db.tables import ViewFeatures
    from difftpt_ops.services.running.contexts import clear_caches
    from difftpt_ops.services.running.features import FeatureCache

    settings, engine, policy, reward = setup
    overrides = {**SMALL, "reward_model": str(reward)}
    first = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                             overrides=overrides, shard_size=3)
    assert first.state == "finished"
    with session_scope(engine) as session:
        sets = [(r.model_name, r.n_views, r.dim) for r in session.scalars(select(ViewFeatures))]
    # Per sample: the policy's 8 views (dim 32) and the reward model's 2 kept views (8 * 0.25; dim 48).
    assert sorted(sets) == sorted([(str(policy), 8, 32)] * 3 + [(str(reward), 2, 48)] * 3)

    built: list[str] = []
    for name in ("_build", "_build_some"):
        original = getattr(FeatureCache, name)

        def recording(self, *args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            built.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(FeatureCache, name, recording)
    clear_caches()
    # Another learning rate: the same views and the same kept views (chosen with the initial prompt).
    warm = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                            overrides={**overrides, "lr": "0.05"}, shard_size=3)
    assert warm.state == "finished" and built == []
    cold = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                            overrides={**overrides, "lr": "0.05", "features": "recompute"}, shard_size=3)
    assert cold.state == "finished"
    a, b = _predictions(engine, warm.run_id), _predictions(engine, cold.run_id)
    assert len(a) == 3 and [r[:3] for r in a] == [r[:3] for r in b]
    assert [r[3] for r in a] == pytest.approx([r[3] for r in b], abs=1e-5)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(ViewFeatures)) == 6  # nothing stored twice


def _textured(engine, root: Path) -> None:  # type: ignore[no-untyped-def]
    """Replace the fixture's solid-colour PNGs (every crop of which is the same pixels, so that no test can see
    a view put in another view's place) by random noise, registered as the samples' content (runs refuse a file
    that differs from its registered hash)."""
    import numpy as np
    from PIL import Image

    from difftpt_ops.data.images import hash_file
    from difftpt_ops.db.tables import Sample

    for i, path in enumerate(sorted(root.rglob("*.png"))):
        pixels = np.random.default_rng(i).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    with session_scope(engine) as session:
        for sample in session.scalars(select(Sample)):
            sample.content_hash = hash_file(root / sample.relpath)


def _check_reward_sets(engine, settings, reward: Path, dataset_root: Path) -> int:  # type: ignore[no-untyped-def]
    """Every stored reward set's rows equal the reward model's output for the views its recipes describe."""
    import torch

    from difftpt_ops.core.specs import ModelSpec
    from difftpt_ops.data.images import load_rgb
    from difftpt_ops.db.tables import Sample, ViewFeatures
    from difftpt_ops.models.clip import load_clip
    from difftpt_ops.storage.features import FeatureFiles, StoredFeatures
    from difftpt_ops.tta.reward import RewardScorer
    from difftpt_ops.tta.views import build_views

    scorer = RewardScorer(load_clip(ModelSpec(name=str(reward), pretrained=None), "cpu"), ["a", "b"])
    files = FeatureFiles(settings.artifact_root)
    checked = 0
    with session_scope(engine) as session:
        paths = {s.content_hash: s.relpath for s in session.scalars(select(Sample))}
        rows = list(session.scalars(select(ViewFeatures).where(ViewFeatures.model_name == str(reward))))
        for row in rows:
            stored = files.read(StoredFeatures(row.artifact_key, row.content_hash, row.size_bytes))
            recipe = row.views[0]
            seed = next((r["seed"] for r in row.views if "seed" in r), 0)
            views = build_views(load_rgb(dataset_root / paths[row.sample_hash]), n_conventional=7, seed=seed,
                                sample_key=row.sample_hash, resolution=recipe["resolution"])
            positions = [0 if r["kind"] == "original" else r["index"] for r in row.views]
            fresh = scorer.encode_raw(views.pixels[positions])
            torch.testing.assert_close(stored.float(), fresh.float(), rtol=1e-4, atol=1e-5)
            checked += 1
    return checked


def test_reward_set_with_some_kept_views_stored_predicts_as_recompute(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A run keeping more views (selection_p 0.5) after one keeping fewer (0.25) reads the stored reward views
    and encodes only the others; it must predict as the same run with features=recompute."""
    from difftpt_ops.db.tables import ViewFeatures

    settings, engine, policy, reward = setup
    _textured(engine, tmp_path / "images")
    base = {**SMALL, "reward_model": str(reward)}
    first = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                             overrides=base, shard_size=3)
    assert first.state == "finished"
    wider = {**base, "selection_p": "0.5"}
    mixed = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                             overrides=wider, shard_size=3)
    cold = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                            overrides={**wider, "features": "recompute"}, shard_size=3)
    assert mixed.state == "finished" and cold.state == "finished"
    with session_scope(engine) as session:
        sets = sorted((r.model_name, r.n_views) for r in session.scalars(select(ViewFeatures)))
    assert sets == sorted([(str(policy), 8)] * 3 + [(str(reward), 2)] * 3 + [(str(reward), 4)] * 3)
    assert _check_reward_sets(engine, settings, reward, tmp_path / "images") == 6
    a, b = _predictions(engine, mixed.run_id), _predictions(engine, cold.run_id)
    assert [r[:3] for r in a] == [r[:3] for r in b]
    assert [r[3] for r in a] == pytest.approx([r[3] for r in b], abs=1e-5)
    # And back: the narrower selection again reads its views out of either stored set.
    again = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                             overrides={**base, "lr": "0.02"}, shard_size=3)
    ref = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                           overrides={**base, "lr": "0.02", "features": "recompute"}, shard_size=3)
    a, b = _predictions(engine, again.run_id), _predictions(engine, ref.run_id)
    assert [r[:3] for r in a] == [r[:3] for r in b]
    assert [r[3] for r in a] == pytest.approx([r[3] for r in b], abs=1e-5)


def test_a_damaged_reward_file_is_discarded_and_recomputed(setup) -> None:  # type: ignore[no-untyped-def]
    """A reward set whose file is damaged is discarded (file and row), recomputed and stored again, and the run
    predicts as with features=recompute."""
    from difftpt_ops.db.tables import ViewFeatures
    from difftpt_ops.storage.features import FeatureFiles

    settings, engine, policy, reward = setup
    base = {**SMALL, "reward_model": str(reward)}
    assert runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                            overrides=base, shard_size=3).state == "finished"
    files = FeatureFiles(settings.artifact_root)
    with session_scope(engine) as session:
        rows = [(r.id, r.artifact_key) for r in session.scalars(select(ViewFeatures)
                                                               .where(ViewFeatures.model_name == str(reward)))]
    assert len(rows) == 3
    damaged = files.path(rows[0][1])
    damaged.chmod(0o644)
    damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")
    warm = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                            overrides={**base, "lr": "0.05"}, shard_size=3)
    cold = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                            overrides={**base, "lr": "0.05", "features": "recompute"}, shard_size=3)
    assert warm.state == "finished" and cold.state == "finished"
    a, b = _predictions(engine, warm.run_id), _predictions(engine, cold.run_id)
    assert [r[:3] for r in a] == [r[:3] for r in b]
    assert [r[3] for r in a] == pytest.approx([r[3] for r in b], abs=1e-5)
    with session_scope(engine) as session:
        again = {r.id: r.artifact_key for r in session.scalars(select(ViewFeatures)
                                                               .where(ViewFeatures.model_name == str(reward)))}
    assert rows[0][0] not in again and len(again) == 3
    import hashlib
    for key in again.values():
        assert hashlib.sha256(files.path(key).read_bytes()).hexdigest() == key.split(".")[0]


def test_an_rlcf_runs_disk_usage_counts_its_reward_models_sets(setup) -> None:  # type: ignore[no-untyped-def]
    """`status`'s disk column (run_disk_usage) of an RLCF run counts the feature sets it stored, its reward
    model's included (as `data show` does)."""
    from difftpt_ops.db.tables import ViewFeatures
    from difftpt_ops.services.reading.disk import run_disk_usage

    settings, engine, policy, reward = setup
    run = runs.submit_tune(engine, settings, dataset_ref="pics", method="rlcf", model=str(policy), pretrained=None,
                           overrides={**SMALL, "reward_model": str(reward)}, shard_size=3)
    assert run.state == "finished"
    with session_scope(engine) as session:
        count, size = session.execute(select(func.count(), func.sum(ViewFeatures.size_bytes))).one()
    assert count == 6
    assert run_disk_usage(engine, settings, [run.run_id])[run.run_id] == {
        "images": 0, "image_bytes": 0, "features": count, "feature_bytes": size}
