"""Pure parts of the job system: shard planning, argument checks, worker identity, launcher, Celery config."""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cli.common import parse_run_id
from cli.jobs import parse_overrides
from difftpt_ops.config import load_settings
from difftpt_ops.core.errors import InputError, ServiceUnavailableError
from difftpt_ops.core.status import RunState
from difftpt_ops.services.running.finalize import final_run_state
from difftpt_ops.services.running.leases import (
    WorkerIdentity,
    is_reclaimable,
    reclaim_reason,
    worker_is_gone,
    worker_name,
)
from difftpt_ops.services.running.outcomes import retry_delay_s
from difftpt_ops.services.running.runs import shard_ranges
from difftpt_ops.services.running.submit_checks import check_execution_args
from workers.launcher import child_specs, claim_node_names, parse_gpus, parse_queues

pytestmark = pytest.mark.unit


def test_shard_ranges_cover_the_range_once() -> None:
    """Contiguous ranges of the shard size, the last one shorter; an extension starts where planning stopped."""
    assert shard_ranges(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(10, 12, 64) == [(10, 12)]
    assert shard_ranges(5, 5, 4) == []


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"limit": 0, "shard_size": None}, "--limit"),
    ({"limit": None, "shard_size": 0}, "--shard-size"),
    ({"limit": None, "shard_size": 10**6}, "--shard-size"),
    ({"limit": None, "shard_size": None, "device": "gpu"}, "--device"),
    ({"limit": None, "shard_size": None, "seed": -1}, "--seed"),
])
def test_execution_args_name_the_bad_argument(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(InputError) as info:
        check_execution_args(**kwargs)  # type: ignore[arg-type]
    assert info.value.argument == argument and info.value.exit_code == 2


def test_cli_parsers() -> None:
    """RUN is an integer id; --set takes KEY=VALUE."""
    assert parse_run_id("12") == 12
    for bad in ("x", "0", "-3"):
        with pytest.raises(InputError, match="RUN="):
            parse_run_id(bad)
    with pytest.raises(InputError, match="^RUN_B=abc: not a run id"):
        parse_run_id("abc", "RUN_B")  # compare's second argument names itself
    assert parse_overrides(["steps=2", "prompt.n_ctx = 8"]) == {"steps": "2", "prompt.n_ctx": "8"}
    with pytest.raises(InputError, match="--set=steps"):
        parse_overrides(["steps"])


def test_final_state_and_backoff() -> None:
    assert final_run_state(0, 0) == RunState.FINISHED
    assert final_run_state(0, 3) == RunState.FINISHED_WITH_FAILURES
    assert final_run_state(1, 0) == RunState.FAILED
    assert [retry_delay_s(a) for a in (1, 2, 3)] == [10.0, 20.0, 40.0] and retry_delay_s(30) == 600.0


def test_worker_identity_and_liveness() -> None:
    """A label names worker, host and pid; only a process of this host that is gone counts as dead."""
    me = WorkerIdentity("difftpt@box-gpu0", gpu="0")
    assert me.label == f"difftpt@box-gpu0 ({socket.gethostname()}:{os.getpid()})"
    assert worker_name(me.label) == "difftpt@box-gpu0" and worker_name("legacy") == "legacy"
    assert not worker_is_gone(me.label)
    assert worker_is_gone(WorkerIdentity("x", pid=2**22 + 7).label)  # above pid_max: no such process
    assert not worker_is_gone(WorkerIdentity("x", host="elsewhere", pid=2**22 + 7).label)
    now = datetime.now(UTC)
    assert not is_reclaimable(now - timedelta(seconds=5), me.label, now=now, stale_after_s=60)
    assert is_reclaimable(now - timedelta(seconds=61), me.label, now=now, stale_after_s=60)
    assert is_reclaimable((now - timedelta(seconds=61)).replace(tzinfo=None), "w", now=now, stale_after_s=60)
    assert is_reclaimable(None, me.label, now=now, stale_after_s=60)
    gone = WorkerIdentity("x", pid=2**22 + 7).label
    assert reclaim_reason(now - timedelta(seconds=5), me.label, now=now, stale_after_s=60) is None
    assert reclaim_reason(now - timedelta(seconds=5), gone, now=now, stale_after_s=60) == "exited"
    assert reclaim_reason(now - timedelta(seconds=61), gone, now=now, stale_after_s=60) == "stopped heartbeating"
    assert reclaim_reason(None, me.label, now=now, stale_after_s=60) == "stopped heartbeating"


def test_gpu_and_queue_choices() -> None:
    """cpu always works; GPUs must exist; `all` takes every visible one."""
    assert parse_gpus("cpu", []) == [None]
    assert parse_gpus("all", ["0", "1"]) == ["0", "1"]
    assert parse_gpus("1", ["0", "1"]) == ["1"]
    with pytest.raises(InputError, match="use --gpus cpu"):
        parse_gpus("0", [])
    for bad in ("2", "0,0", ","):
        with pytest.raises(InputError, match="--gpus"):
            parse_gpus(bad, ["0", "1"])
    assert parse_queues("tune") == ["tune"] and parse_queues("generate, tune") == ["generate", "tune"]
    with pytest.raises(InputError, match="--queues"):
        parse_queues("gpu")


def test_child_specs_bind_one_gpu_per_solo_worker(tmp_path: Path) -> None:
    """Each child: its own CUDA_VISIBLE_DEVICES, solo pool, prefetch 1, a host+GPU name, explicit settings."""
    settings = load_settings(tmp_path, env={"DIFFTPT_OPS_BROKER_URL": "redis://h:6379/1"})
    specs = child_specs(settings, gpus=["0", "3"], queues=["tune"], concurrency_per_gpu=2, host="box")
    assert [s.name for s in specs] == ["difftpt@box-gpu0-0-tune", "difftpt@box-gpu0-1-tune",
                                       "difftpt@box-gpu3-0-tune", "difftpt@box-gpu3-1-tune"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "0", "3", "3"]
    argv = " ".join(specs[0].argv)
    assert "-P solo" in argv and "--prefetch-multiplier 1" in argv and "-Q tune" in argv
    assert specs[0].env["DIFFTPT_OPS_BROKER_URL"] == "redis://h:6379/1"
    assert specs[0].env["DIFFTPT_OPS_DATABASE_URL"] == settings.database_url
    [cpu] = child_specs(settings, gpus=[None], queues=["generate", "tune"], host="box")
    assert (cpu.name, cpu.env["CUDA_VISIBLE_DEVICES"], cpu.env["DIFFTPT_OPS_DEVICE"]) == ("difftpt@box-cpu", "", "cpu")
    assert specs[0].env["DIFFTPT_OPS_DEVICE"] == "cuda"  # a GPU child never resolves "auto" to the CPU


def test_celery_configuration(tmp_path: Path) -> None:
    """JSON only, late acks, reject on worker lost, prefetch 1, no results, visibility timeout from settings."""
    from workers.celery_app import make_celery

    settings = load_settings(tmp_path, env={"DIFFTPT_OPS_BROKER_URL": "redis://h:6379/1",
                                            "DIFFTPT_OPS_VISIBILITY_TIMEOUT_S": "7200"})
    conf = make_celery(settings).conf
    assert (conf.task_serializer, conf.result_serializer, list(conf.accept_content)) == ("json", "json", ["json"])
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
    assert conf.worker_prefetch_multiplier == 1 and conf.broker_connection_retry_on_startup
    assert conf.broker_transport_options == {"visibility_timeout": 7200}
    assert sorted(q.name for q in conf.task_queues) == ["generate", "tune"]
    assert {q.name: q.routing_key for q in conf.task_queues} == {"generate": "generate", "tune": "tune"}


def test_unreachable_broker_is_reported_fast(tmp_path: Path) -> None:
    """A refused connection becomes a one-line ServiceUnavailableError within seconds."""
    from workers.tasks import dispatcher_for

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused
        settings = load_settings(tmp_path, env={"DIFFTPT_OPS_BROKER_URL": f"redis://127.0.0.1:{port}/0"})
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match=f"broker redis://127.0.0.1:{port}/0 is unreachable"):
            dispatcher_for(settings).check()
    assert time.monotonic() - started < 6


def test_a_local_model_directory_is_recorded_absolute_and_without_a_tag(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory's own weights load whatever the tag says, so the default "openai" is not recorded; a
    relative path is made absolute (it would name another folder elsewhere); hub names are kept as typed."""
    from difftpt_ops.services.running.submit_checks import run_model_spec

    (tmp_path / "clip").mkdir()
    (tmp_path / "ckpt.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    local = run_model_spec("clip", "openai", "cpu")
    assert (local.name, local.pretrained, local.precision) == (str(tmp_path / "clip"), None, "fp32")
    named = run_model_spec("ViT-B-16", "openai", "cuda")
    assert (named.name, named.pretrained, named.precision) == ("ViT-B-16", "openai", "fp16")
    assert run_model_spec("RN50", "ckpt.pt", "cpu").pretrained == str(tmp_path / "ckpt.pt")


def test_a_generator_path_is_checked_in_embedded_mode_and_made_absolute(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from difftpt_ops.core.specs import GenerationSpec
    from difftpt_ops.services.running.submit_checks import generator_path_checked

    settings = load_settings(tmp_path, env={})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="--model=./nomodel: no such local model directory"):
        generator_path_checked(settings, GenerationSpec(model="./nomodel"))
    (tmp_path / "sd").mkdir()
    with pytest.raises(InputError, match="not a diffusers pipeline"):
        generator_path_checked(settings, GenerationSpec(model="sd", revision=None))
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    assert generator_path_checked(settings, GenerationSpec(model="sd", revision=None)).model == str(tmp_path / "sd")
    with pytest.raises(InputError, match="--revision=v2.0: .*local directory"):  # would be another config
        generator_path_checked(settings, GenerationSpec(model="sd", revision="v2.0"))
    hub = GenerationSpec(model="lambdalabs/sd-image-variations-diffusers")
    assert generator_path_checked(settings, hub) == hub


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_a_second_supervisor_on_a_host_gets_distinct_node_names(tmp_path: Path) -> None:
    """Two supervisors with the same GPUs and queues build the same Celery node names; the second one's
    children get its pid as a suffix, and a name is free again once its holder is gone."""
    settings = load_settings(tmp_path, env={"DIFFTPT_OPS_BROKER_URL": "redis://127.0.0.1:6379/0"})
    specs = child_specs(settings, gpus=[None], queues=["tune"], host=f"box{os.getpid()}")
    first, held_first = claim_node_names(specs, suffix="111")
    second, held_second = claim_node_names(specs, suffix="222")
    try:
        assert first[0].name == specs[0].name and second[0].name == specs[0].name + "-222"
        assert second[0].argv[second[0].argv.index("-n") + 1] == specs[0].name + "-222"
    finally:
        for holder in held_first + held_second:
            holder.close()
    third, held_third = claim_node_names(specs, suffix="333")
    for holder in held_third:
        holder.close()
    assert third[0].name == specs[0].name
