"""Every SQL example of README.md and docs/results.md runs unchanged against the demo's runs.

The demo registers `demo-photos`, generates (run 1), then submits zero-shot, TPT and DiffTPT in that order
(runs 2, 3, 4). This test builds the same runs the same way, with smaller sizes (fewer views and images:
sizes change no id), on SQLite and PostgreSQL, and runs each example through the read-only `sql` path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from difftpt_ops.data.demo_photos import write_demo_dataset
from difftpt_ops.services import demo
from difftpt_ops.services.datasets import register_dataset
from difftpt_ops.services.reading.sql import ensure_reader_role, run_readonly_sql
from difftpt_ops.services.running.runs import submit_generate, submit_tune
from tests.integration.test_jobs_support import make_settings, open_engine

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md"]
METHOD_NAMES = {"zero-shot": "zeroshot", "TPT": "tpt", "DiffTPT": "difftpt"}


def sql_examples() -> list[tuple[str, str, str]]:
    """(file, comment above the statement, statement) for each statement of each ```sql block."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```sql\n(.*?)```", doc.read_text(), re.S):
            comment: list[str] = []
            statement: list[str] = []
            for line in block.splitlines():
                if line.lstrip().startswith("--"):  # comments may hold ';' too: they are not statement ends
                    comment.append(line)
                elif line.strip():
                    statement.append(line)
                    if line.rstrip().endswith(";"):
                        found.append((doc.name, " ".join(comment), "\n".join(statement).rstrip().rstrip(";")))
                        comment, statement = [], []
    return found


EXAMPLES = sql_examples()


def _demo_order() -> tuple[str, ...]:
    # The demo's method order decides its run ids; the first three are the ones the docs use.
    methods = demo.episodic_methods() if hasattr(demo, "episodic_methods") else demo.METHODS
    return tuple(methods)[:3]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def demo_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path,
              one_torch_thread: None):  # type: ignore[no-untyped-def]
    """The demo's dataset and runs 1-4 (generation, zero-shot, TPT, DiffTPT) with small sizes."""
    from tests.conftest import scratch_database

    workspace = tmp_path_factory.mktemp(f"demo-sql-{request.param}")
    with scratch_database(request.param, workspace) as url:
        settings = make_settings(workspace, url, mlflow_tracking_uri="none")
        engine = open_engine(settings)
        ensure_reader_role(engine)  # as `difftpt-ops db upgrade` does: `sql` runs as the read-only role
        write_demo_dataset(workspace / "demo-data")
        register_dataset(engine, name=demo.DEMO_DATASET, root=workspace / "demo-data", format="imagefolder")
        from difftpt_ops.core.specs import GenerationSpec

        spec = GenerationSpec(model=str(tiny_models_dir / "sd-image-variations"), revision=None, steps=2,
                              per_sample=2, scheduler="default", size=32, dtype="fp32")
        generation = submit_generate(engine, settings, dataset_ref=demo.DEMO_DATASET, spec=spec, device="cpu")
        small = {"zeroshot": {}, "tpt": {"n_views": "8"}, "difftpt": {"n_conventional": "8", "n_generated": "2"}}
        run_ids = {"generate": generation.run_id}
        for method in _demo_order():
            run_ids[method] = submit_tune(
                engine, settings, dataset_ref=demo.DEMO_DATASET, method=method, model=str(tiny_models_dir / "clip"),
                pretrained=None, overrides=small[method], device="cpu",
                generation_id=generation.generation_config_id if method == "difftpt" else None).run_id
        yield settings, run_ids
        engine.dispose()


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 10 and {name for name, _, _ in EXAMPLES} == {"README.md", "results.md"}


def test_demo_order_and_ids_are_what_the_docs_say(demo_runs) -> None:  # type: ignore[no-untyped-def]
    """Generation is run 1, then zero-shot, TPT, DiffTPT as runs 2, 3, 4; every `run N (Method)` agrees."""
    _, run_ids = demo_runs
    assert run_ids == {"generate": 1, "zeroshot": 2, "tpt": 3, "difftpt": 4}
    for _, comment, _ in EXAMPLES:
        for number, method in re.findall(r"run (\d+) \(([\w-]+)\)", comment):
            assert run_ids[METHOD_NAMES[method]] == int(number), comment
    for _, _, statement in EXAMPLES:
        for number in re.findall(r"\brun(?:_id|_a|_b)\s*=\s*(\d+)", statement):
            assert int(number) in run_ids.values(), statement
        for name in re.findall(r"dataset\s*=\s*'([^']+)'", statement):
            assert name == demo.DEMO_DATASET, statement


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{n}:{i}" for i, (n, _, _) in enumerate(EXAMPLES)])
def test_example_runs_unchanged(demo_runs, example: tuple[str, str, str]) -> None:  # type: ignore[no-untyped-def]
    """Each example runs as printed, read-only, and returns rows on the demo's runs."""
    settings, _ = demo_runs
    _, comment, statement = example
    columns, rows = run_readonly_sql(settings, statement)
    assert columns
    # Which samples random weights fix is chance; every other example must find rows.
    if "fixed" not in comment:
        assert rows, statement
