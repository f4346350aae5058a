"""Online runs in-process (embedded executor) on tiny models, SQLite and PostgreSQL: ordered chains,
checkpoints, a damaged checkpoint, order seeds, and the chain's gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from typer.testing import CliRunner

from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import OnlineCheckpoint, Prediction, Run
from difftpt_ops.services.running import checkpoints, contexts, embedded, online, outcomes, runs, shards
from difftpt_ops.services.running.leases import WorkerIdentity
from difftpt_ops.services.running.status import run_status
from tests.integration.test_jobs_support import RecordingDispatcher, count, distinct_predictions, shard_rows
from tests.integration.test_online_support import (
    N_SAMPLES,
    OVERRIDES,
    SHARD_SIZE,
    assert_same_run,
    cli_workspace,
    image_dataset,
    online_settings,
    predictions,
    stored_logits,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


# DPE evolves its text prototypes only on confident predictions, which a tiny random model never makes: with
# these settings every sample moves them, so the checkpoints must carry them for a resumed run to be exact.
# BoostAdapter takes 10% of the views as boosting samples: 12 views give one per sample. OGA predicts in batches
# (its code's 32 by default), which a shard of 4 cannot split: batches of 2, two per shard, the last one at the
# end of the 18-sample stream. DynaPrompt: a buffer of 4 prompts, so the 18 samples recycle it several times and
# the checkpoints must carry the tuned contexts, their order and their use counters.
METHOD_OVERRIDES = {"dpe": {"evolve_threshold": "1.0", "lr_text": "0.01"}, "boostadapter": {"n_views": "12"},
                    "oga": {"batch_size": "2"}, "dynaprompt": {"num_prompts": "4"}}


def _submit(engine, settings, clip: Path, method: str = "tda", **kwargs):  # type: ignore[no-untyped-def]
    common = {} if method in ("onzeta", "ecalp", "oga") else OVERRIDES  # these read the original view only
    overrides = {**common, **METHOD_OVERRIDES.get(method, {}), **kwargs.pop("overrides", {})}
    return runs.submit_tune(engine, settings, dataset_ref="pics", method=method, model=str(clip), pretrained=None,
                            shard_size=SHARD_SIZE, overrides=overrides, **kwargs)


@pytest.fixture
def reference(tmp_path: Path, tiny_models_dir: Path):  # type: ignore[no-untyped-def]
    """Uninterrupted runs in a separate SQLite workspace, by (method, order seed)."""
    settings, engine = online_settings(tmp_path / "ref", f"sqlite:///{tmp_path / 'ref.db'}")
    image_dataset(engine, tmp_path / "images")
    done: dict[tuple[str, int], int] = {}

    def get(method: str = "tda", order_seed: int = 0):  # type: ignore[no-untyped-def]
        if (method, order_seed) not in done:
            result = _submit(engine, settings, tiny_models_dir / "clip", method,
                             overrides={"order_seed": str(order_seed)})
            done[(method, order_seed)] = result.run_id
        return engine, settings, done[(method, order_seed)]

    contexts.clear_caches()
    return get


@pytest.mark.parametrize("method", ["tda", "dmn-zs", "dpe", "boostadapter", "onzeta", "ecalp", "oga", "dynaprompt"])
def test_online_run_is_an_ordered_checkpointed_chain(workspace: Path, database_url: str, tmp_path: Path,
                                                     tiny_models_dir: Path, method: str) -> None:
    """One prediction per sample, one checkpoint per shard covering its stream positions, in the seeded order."""
    settings, engine = online_settings(workspace, database_url)
    image_dataset(engine, tmp_path / "images")
    result = _submit(engine, settings, tiny_models_dir / "clip", method)
    assert (result.state, result.shards_total) == ("finished", -(-N_SAMPLES // SHARD_SIZE))
    assert count(engine, Prediction, result.run_id) == distinct_predictions(engine, result.run_id) == N_SAMPLES
    with session_scope(engine) as session:
        rows = session.execute(select(OnlineCheckpoint.shard_index, OnlineCheckpoint.position)
                               .where(OnlineCheckpoint.run_id == result.run_id)
                               .order_by(OnlineCheckpoint.shard_index)).all()
    assert [tuple(c) for c in rows] == [(s.index, s.stop) for s in shard_rows(engine, result.run_id)]
    for index, data in checkpoints.shard_checkpoints(engine, settings, result.run_id):
        _, logits, positions = checkpoints.decode_checkpoint(data)
        shard = shard_rows(engine, result.run_id)[index]
        assert positions.tolist() == list(range(shard.start, shard.stop)) and logits.shape == (len(positions), 3)
    # Stored predictions follow the stored logits of the sample at each stream position.
    order = online.stream_order(N_SAMPLES, 0)
    stored = predictions(engine, result.run_id)
    for index, data in checkpoints.shard_checkpoints(engine, settings, result.run_id):
        _, logits, positions = checkpoints.decode_checkpoint(data)
        for position, row in zip(positions.tolist(), logits, strict=True):
            assert stored[order[position]][0] == int(row.argmax())


@pytest.mark.parametrize("method", ["tda", "dpe", "boostadapter", "onzeta", "ecalp", "oga", "dynaprompt"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(workspace: Path, database_url: str,
                                                                    tmp_path: Path, tiny_models_dir: Path,
                                                                    reference, method: str) -> None:  # type: ignore[no-untyped-def]
    """Cut the newest checkpoint short: the next shard starts from the one before, replays, and the run
    ends identical to an uninterrupted one, the damaged file rewritten intact. (DPE: its evolving text
    prototypes travel in the checkpoint too.)"""
    settings, engine = online_settings(workspace, database_url)
    image_dataset(engine, tmp_path / "images")
    first = _submit(engine, settings, tiny_models_dir / "clip", method, limit=3 * SHARD_SIZE)
    assert first.state == "finished"
    with session_scope(engine) as session:
        newest = session.scalars(select(OnlineCheckpoint).where(OnlineCheckpoint.run_id == first.run_id)
                                 .order_by(OnlineCheckpoint.shard_index.desc())).first()
        path = checkpoints.checkpoint_store(settings).path(newest.artifact_key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    contexts.clear_caches()
    online._in_memory.clear()  # another process: the state must come from the files
    assert [d is None for _, d in checkpoints.shard_checkpoints(engine, settings, first.run_id)] == [False, False, True]
    rest = _submit(engine, settings, tiny_models_dir / "clip", method)
    assert (rest.run_id, rest.state) == (first.run_id, "finished")
    assert all(d is not None for _, d in checkpoints.shard_checkpoints(engine, settings, first.run_id))
    assert_same_run(engine, settings, first.run_id, *reference(method))


def test_order_seed_makes_another_run_with_another_order(workspace: Path, database_url: str, tmp_path: Path,
                                                        tiny_models_dir: Path) -> None:
    """A different order seed is another run (another fingerprint) that sees the samples in another order."""
    settings, engine = online_settings(workspace, database_url)
    image_dataset(engine, tmp_path / "images")
    zero = _submit(engine, settings, tiny_models_dir / "clip", limit=SHARD_SIZE)
    one = _submit(engine, settings, tiny_models_dir / "clip", limit=SHARD_SIZE, overrides={"order_seed": "1"})
    assert zero.run_id != one.run_id and zero.fingerprint != one.fingerprint
    first_zero, first_one = (online.stream_order(N_SAMPLES, seed)[:SHARD_SIZE] for seed in (0, 1))
    assert first_zero != first_one
    assert sorted(predictions(engine, zero.run_id)) == sorted(first_zero)
    assert sorted(predictions(engine, one.run_id)) == sorted(first_one)


def test_the_chain_gate_lets_one_link_run_at_a_time(workspace: Path, database_url: str, tmp_path: Path,
                                                    tiny_models_dir: Path) -> None:
    """With every shard's message delivered at once, only the first link can be claimed; finishing it hands
    over exactly the next one."""
    settings, engine = online_settings(workspace, database_url, broker_url="redis://127.0.0.1:1/0")
    image_dataset(engine, tmp_path / "images")
    dispatcher = RecordingDispatcher()
    planned = _submit(engine, settings, tiny_models_dir / "clip", limit=3 * SHARD_SIZE, dispatcher=dispatcher)
    links = shard_rows(engine, planned.run_id)
    assert sorted(t.shard_id for t in dispatcher.tickets) == [s.id for s in links]  # a broker submit sends all
    identity = WorkerIdentity(name="test")
    assert shards.execute_shard(engine, settings, links[1].id, identity=identity).outcome == outcomes.Outcome.SKIPPED
    assert online.claim_chained(engine, settings, links[2].id, identity) is None
    first = shards.execute_shard(engine, settings, links[0].id, identity=identity)
    assert first.outcome == outcomes.Outcome.DONE
    assert [t.shard_id for t in first.follow_up] == [links[1].id]
    assert [s.state for s in shard_rows(engine, planned.run_id)] == ["done", "queued", "queued"]
    assert shards.execute_shard(engine, settings, links[2].id, identity=identity).outcome == outcomes.Outcome.SKIPPED
    second = shards.execute_shard(engine, settings, links[1].id, identity=identity)
    assert [t.shard_id for t in second.follow_up] == [links[2].id]


def test_an_embedded_chain_goes_on_after_a_link_is_retried(workspace: Path, database_url: str, tmp_path: Path,
                                                           tiny_models_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded executor skips links the chain's gate refuses; when the first link fails once and its retry
    succeeds, the links after it still run (the retry's follow-up), and the run finishes."""
    settings, engine = online_settings(workspace, database_url)
    image_dataset(engine, tmp_path / "images")
    monkeypatch.setattr(outcomes, "RETRY_BACKOFF_S", 0.0)
    original, failures = online._start_state, {"left": 1}

    def fail_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    seen: list[bool] = []  # whether the run read stopped before each link (it never should: this process holds it)
    execute = embedded.execute_shard

    def look_then_execute(engine, settings, shard_id, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(run_status(engine, settings, result_id(engine))[0]["stopped"])
        return execute(engine, settings, shard_id, **kwargs)

    def result_id(engine):  # type: ignore[no-untyped-def]
        with session_scope(engine) as session:
            return session.scalar(select(Run.id))

    monkeypatch.setattr(online, "_start_state", fail_once)
    monkeypatch.setattr(embedded, "execute_shard", look_then_execute)
    result = _submit(engine, settings, tiny_models_dir / "clip", limit=3 * SHARD_SIZE)
    assert result.state == "finished"
    assert seen and not any(seen)
    assert [(s.state, s.attempts) for s in shard_rows(engine, result.run_id)] == [("done", 2), ("done", 1),
                                                                                  ("done", 1)]
    assert count(engine, Prediction, result.run_id) == 3 * SHARD_SIZE


def test_submit_cli_rejects_an_episodic_option_in_one_line(workspace: Path, tiny_models_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`--set steps=1` on an online method: exit code 2, one line naming the option, nothing planned."""
    from cli.main import app

    monkeypatch.setenv("DIFFTPT_OPS_WORKSPACE", str(workspace))

    result = CliRunner().invoke(app, ["submit", "tune", "--dataset", "pics", "--method", "tda", "--model",
                                      str(tiny_models_dir / "clip"), "--pretrained", "none", "--set", "steps=1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "steps" in lines[0] and "tda" in lines[0]


def test_orders_submits_k_runs_and_results_summarise_them(workspace: Path, tmp_path: Path, tiny_models_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`--orders 3` makes runs with order seeds 0..2; `results` and `compare` report top-1 mean, std, min, max."""
    import json
    import statistics

    from cli.main import app

    settings, engine = cli_workspace(workspace, tmp_path / "images", monkeypatch, n=8)
    runner = CliRunner()
    submitted = runner.invoke(app, ["submit", "tune", "--dataset", "pics", "--method", "dmn-zs", "--model",
                                    str(tiny_models_dir / "clip"), "--pretrained", "none", "--set", "n_views=2",
                                    "--orders", "3", "--json"])
    assert submitted.exit_code == 0, submitted.output
    run_ids = [p["run_id"] for p in json.loads(submitted.output)["points"]]
    assert len(set(run_ids)) == 3
    top1 = []
    for run_id in run_ids:
        stored = predictions(engine, run_id)
        labels = {i: i % 3 for i in range(8)}
        top1.append(sum(pred == labels[i] for i, (pred, _) in stored.items()) / len(stored))
    shown = json.loads(runner.invoke(app, ["results", str(run_ids[1]), "--json"]).output)["orders"]
    assert shown["runs"] == sorted(run_ids) and shown["order_seeds"] == [0, 1, 2] and shown["all_finished"]
    assert shown["top1_mean"] == pytest.approx(statistics.fmean(top1))
    assert shown["top1_std"] == pytest.approx(statistics.stdev(top1))
    assert (shown["top1_min"], shown["top1_max"]) == (pytest.approx(min(top1)), pytest.approx(max(top1)))
    compared = json.loads(runner.invoke(app, ["compare", str(run_ids[0]), str(run_ids[2]), "--json"]).output)
    assert compared["orders_a"] == compared["orders_b"] == shown
    rejected = runner.invoke(app, ["submit", "tune", "--dataset", "pics", "--method", "tpt", "--orders", "2"])
    assert rejected.exit_code == 2 and "--orders=2" in rejected.output
    # `runs list` tells the orders apart (they share seed and settings).
    listed = {r["run_id"]: r for r in json.loads(runner.invoke(app, ["runs", "list", "--json"]).output)}
    assert [listed[r]["order_seed"] for r in run_ids] == [0, 1, 2]
    rows = [line.split("\t") for line in runner.invoke(app, ["runs", "list", "--format", "tsv"]).output.splitlines()]
    seeds = {row[0]: row[rows[0].index("seed")] for row in rows[1:]}
    assert [seeds[str(r)] for r in run_ids] == ["0 order=0", "0 order=1", "0 order=2"]
    assert "stream order seed 2" in runner.invoke(app, ["runs", "show", str(run_ids[2])]).output
    # Another order on the first 4 samples of its stream covers other samples: not one of the group's orders.
    limited = runner.invoke(app, ["submit", "tune", "--dataset", "pics", "--method", "dmn-zs", "--model",
                                  str(tiny_models_dir / "clip"), "--pretrained", "none", "--set", "n_views=2",
                                  "--order-seed", "5", "--limit", "4", "--json"])
    assert limited.exit_code == 0, limited.output
    assert json.loads(runner.invoke(app, ["results", str(run_ids[1]), "--json"]).output)["orders"] == shown
    table = json.loads(runner.invoke(app, ["table", "--json"]).output)
    [cell] = [row["cells"]["pics"] for row in table["rows"] if row["method"] == "dmn-zs"]
    assert len(cell["runs"]) == 1 and cell["n"] == 4  # the newest run alone: its samples, not a mean over others


def test_online_runs_default_to_their_own_shard_size(workspace: Path, tmp_path: Path, tiny_models_dir: Path) -> None:
    """Without --shard-size an online run takes `online_shard_size` (a checkpoint per shard), others `shard_size`."""
    settings, engine = online_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}", shard_size="3",
                                       online_shard_size="4")
    image_dataset(engine, tmp_path / "images")
    clip = str(tiny_models_dir / "clip")
    tda = runs.submit_tune(engine, settings, dataset_ref="pics", method="tda", model=clip, pretrained=None,
                           limit=8, overrides=OVERRIDES)
    zeroshot = runs.submit_tune(engine, settings, dataset_ref="pics", method="zeroshot", model=clip, pretrained=None,
                                limit=6)
    assert [(s.start, s.stop) for s in shard_rows(engine, tda.run_id)] == [(0, 4), (4, 8)]
    assert [(s.start, s.stop) for s in shard_rows(engine, zeroshot.run_id)] == [(0, 3), (3, 6)]
    assert (tda.state, zeroshot.state) == ("finished", "finished")


def test_a_dry_run_finds_the_run_a_submit_resolved_per_dataset(workspace: Path, tmp_path: Path,
                                                               tiny_models_dir: Path) -> None:
    """TDA's spec is resolved at submit (per-dataset alpha, beta, views, prompts); the dry run resolves it the
    same way, so it names the run a submit would attach to and has nothing left to do."""
    from difftpt_ops.services.running.estimate import estimate_tune

    settings, engine = online_settings(workspace, f"sqlite:///{workspace / 'difftpt.db'}")
    image_dataset(engine, tmp_path / "images")
    clip = str(tiny_models_dir / "clip")
    args = {"dataset_ref": "pics", "method": "tda", "model": clip, "pretrained": None, "generation_id": None,
            "overrides": OVERRIDES, "seed": 0, "limit": 8, "shard_size": None}
    before = estimate_tune(engine, settings, **args)  # type: ignore[arg-type]
    assert (before.existing_run_id, before.samples_to_do) == (None, 8)
    run = runs.submit_tune(engine, settings, dataset_ref="pics", method="tda", model=clip, pretrained=None, limit=8,
                           overrides=OVERRIDES)
    after = estimate_tune(engine, settings, **args)  # type: ignore[arg-type]
    assert (after.existing_run_id, after.samples_to_do, after.shards_new) == (run.run_id, 0, 0)


def test_online_links_record_where_they_ran(workspace: Path, database_url: str, tmp_path: Path,
                                            tiny_models_dir: Path) -> None:
    """Every link of a finished online run records its provenance, so `runs show` names the machine, as it does
    for an episodic run's shards (it said "no shard has run yet" for a finished online run)."""
    from difftpt_ops.services.running.status import show_run

    settings, engine = online_settings(workspace, database_url)
    image_dataset(engine, tmp_path / "images")
    result = _submit(engine, settings, tiny_models_dir / "clip", "tda")
    assert result.state == "finished"
    shown = show_run(engine, result.run_id)
    assert [len(group["shards"]) for group in shown["shard_provenance"]] == [result.shards_total]
    assert shown["shard_provenance"][0]["device"] == "cpu"


@pytest.mark.parametrize("method", ["tda", "onzeta", "ecalp", "oga", "dynaprompt"])
def test_a_first_shard_of_unreadable_samples_resumes_from_its_empty_checkpoint(
        workspace: Path, database_url: str, tmp_path: Path, tiny_models_dir: Path, method: str) -> None:
    """Every sample of shard 0 unreadable: its checkpoint holds no state (the method never started). Another
    process resuming from it starts the state fresh at the next readable sample, as the uninterrupted run does
    (it failed with KeyError on the empty state: 'shape' for TDA, 'position' for OnZeta)."""
    def unreadable_first_shard(root: Path) -> None:
        for index in online.stream_order(N_SAMPLES, 0)[:SHARD_SIZE]:
            (root / f"class{index % 3}" / f"{index}.png").write_bytes(b"not an image")

    ref_settings, ref_engine = online_settings(tmp_path / "ref", f"sqlite:///{tmp_path / 'ref.db'}")
    image_dataset(ref_engine, tmp_path / "ref-images")
    unreadable_first_shard(tmp_path / "ref-images")
    contexts.clear_caches()
    whole = _submit(ref_engine, ref_settings, tiny_models_dir / "clip", method)
    assert whole.state == "finished_with_failures"
    settings, engine = online_settings(workspace, database_url)
    image_dataset(engine, tmp_path / "images")
    unreadable_first_shard(tmp_path / "images")
    contexts.clear_caches()
    first = _submit(engine, settings, tiny_models_dir / "clip", method, limit=SHARD_SIZE)
    assert first.state == "finished_with_failures"
    contexts.clear_caches()
    online._in_memory.clear()  # another process: the state must come from the files
    rest = _submit(engine, settings, tiny_models_dir / "clip", method)
    assert (rest.run_id, rest.state) == (first.run_id, "finished_with_failures")
    assert count(engine, Prediction, rest.run_id) == N_SAMPLES - SHARD_SIZE
    got, want = predictions(engine, rest.run_id), predictions(ref_engine, whole.run_id)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    logits, ref_logits = stored_logits(engine, settings, rest.run_id), stored_logits(ref_engine, ref_settings,
                                                                                     whole.run_id)
    assert sorted(logits) == sorted(ref_logits) == list(range(SHARD_SIZE, N_SAMPLES))
    for position, row in ref_logits.items():
        torch.testing.assert_close(logits[position], row, rtol=0, atol=1e-6)
