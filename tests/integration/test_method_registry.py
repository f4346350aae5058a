"""The method registry: a throw-away method defined here runs through `submit tune` with no other change;
`methods list` shows what the registry holds; registration refuses inconsistent methods."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

torch = pytest.importorskip("torch")

from sqlalchemy import select  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from difftpt_ops.core import method_specs, run_specs  # noqa: E402
from difftpt_ops.core.errors import InvalidSpecError  # noqa: E402
from difftpt_ops.core.method_specs import MethodSpec, method_spec_from  # noqa: E402
from difftpt_ops.core.specs import ModelSpec, require  # noqa: E402
from difftpt_ops.db.session import session_scope  # noqa: E402
from difftpt_ops.db.tables import Prediction, Sample, ViewScore  # noqa: E402
from difftpt_ops.models.clip import load_clip  # noqa: E402
from difftpt_ops.services.reading import reporting  # noqa: E402
from difftpt_ops.services.running import contexts, runs  # noqa: E402
from difftpt_ops.tta.methods import (  # noqa: E402
    ForwardOnlyMethod,
    StepInputs,
    StepOutput,
    ViewPlan,
    ViewScores,
    get_method,
    method_names,
    register,
    registered,
    unregister,
)
from difftpt_ops.tta.naive import NaiveTuner  # noqa: E402
from difftpt_ops.tta.views import build_views  # noqa: E402
from tests.integration.test_jobs_support import add_dataset, make_settings, open_engine, write_pictures  # noqa: E402
from tests.unit.tta_support import random_image  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


@dataclass(frozen=True)
class MeanViewSpec(MethodSpec):
    method: ClassVar[str] = "meanview-test"
    n_views: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n_views >= 1, "n_views", self.n_views, "must be >= 1")


class MeanView(ForwardOnlyMethod):
    """Predicts the mean of its views' logits and keeps the views above the median entropy out."""

    name: ClassVar[str] = "meanview-test"
    spec_class = MeanViewSpec
    summary: ClassVar[str] = "mean of the views' logits (test method)"

    def views(self, spec: MeanViewSpec) -> ViewPlan:
        return ViewPlan(n_conventional=spec.n_views - 1, resolution=spec.resolution)

    def step(self, spec: MeanViewSpec, inputs: StepInputs) -> StepOutput:
        return StepOutput(logits=inputs.logits.mean(dim=0), scores=ViewScores.all_kept(inputs.logits))


@pytest.fixture
def meanview() -> Iterator[type[MeanView]]:
    register(MeanView)
    try:
        yield MeanView
    finally:
        unregister(MeanView.name)


def test_a_method_defined_in_a_test_module_runs_through_submit_tune(
        meanview: type[MeanView], tiny_models_dir: Path, workspace: Path, tmp_path: Path, database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reporting, "report_progress", lambda *_: None)
    monkeypatch.setattr(reporting, "report_finished", lambda *_: None)
    monkeypatch.setattr(reporting, "_next_report", {})
    contexts.clear_caches()
    settings = make_settings(workspace, database_url, device="cpu", mlflow_tracking_uri="none")
    engine = open_engine(settings)
    root = tmp_path / "images"
    relpaths = write_pictures(root, 2, seed=40, size=(50, 40))
    add_dataset(engine, "pics", 2, root=root, classes=2, relpaths=relpaths)
    model = str(tiny_models_dir / "clip")
    result = runs.submit_tune(engine, settings, dataset_ref="pics", method="meanview-test", model=model,
                              pretrained=None, overrides={"n_views": "3"})
    assert (result.method, result.state) == ("meanview-test", "finished")
    with session_scope(engine) as session:
        predictions = list(session.execute(select(Prediction.sample_index, Prediction.pred, Prediction.n_views)
                                           .order_by(Prediction.sample_index)))
        views = session.scalars(select(ViewScore.kept).where(ViewScore.run_id == result.run_id)).all()
    assert [p.n_views for p in predictions] == [3, 3] and len(views) == 6 and all(views)
    # The oracle: the straightforward computation of the same mean, image encoder and full-length prompts.
    clip = load_clip(ModelSpec(name=model, pretrained=None, precision="fp32"), "cpu")
    spec = method_spec_from("meanview-test", {"n_views": "3"})
    naive = NaiveTuner(clip, ["class0", "class1"], spec)
    with session_scope(engine) as session:
        hashes = dict(session.execute(select(Sample.index, Sample.content_hash)).all())
    for index, pred, _ in predictions:
        image = random_image(40 + index, (50, 40))
        pixels = build_views(image, n_conventional=2, seed=0, sample_key=hashes[index], resolution=224).pixels
        with torch.no_grad():
            features = torch.nn.functional.normalize(clip.model.encode_image(pixels).float(), dim=-1)
            text = torch.nn.functional.normalize(naive._encode_text().float(), dim=-1)
            expected = (clip.model.logit_scale.exp() * features @ text.t()).mean(0).argmax()
        assert pred == int(expected)
        assert naive.run(image, seed=0, sample_key=hashes[index]).pred == pred


def test_registry_feeds_specs_and_errors(meanview: type[MeanView]) -> None:
    assert {"zeroshot", "tpt", "difftpt", "meanview-test"} <= set(method_names())
    assert set(method_specs.USER_METHODS) == set(method_names())
    assert method_specs.METHOD_SPECS["meanview-test"] is MeanViewSpec
    assert method_spec_from("meanview-test", {"n_views": "5"}) == MeanViewSpec(n_views=5)
    with pytest.raises(InvalidSpecError) as info:
        method_spec_from("meanview-test", {"n_views": "0"})
    assert info.value.argument == "--set n_views" and info.value.value == "0"
    kinds = {m.name: m.kind for m in registered()}
    assert (kinds["zeroshot"], kinds["tpt"], kinds["difftpt"]) == ("forward-only", "prompt-tuning", "prompt-tuning")
    unregister("meanview-test")
    with pytest.raises(InvalidSpecError) as info:
        get_method("meanview-test")
    assert info.value.argument == "--method" and "meanview-test" not in method_specs.USER_METHODS
    register(MeanView)  # the fixture unregisters it again


def test_registration_refuses_inconsistent_methods() -> None:
    class WrongSpecName(MeanView):
        name: ClassVar[str] = "not-the-spec-name"

    class NoKind(MeanView):
        kind: ClassVar[str] = "sometimes"

    class Impostor(MeanView):
        name: ClassVar[str] = "tpt"
        spec_class = method_specs.TPTSpec

    for cls, problem in ((WrongSpecName, "spec_class.method"), (NoKind, "kind"), (Impostor, "already registered")):
        with pytest.raises(ValueError, match=problem):
            register(cls)
    assert get_method("tpt").spec_class is method_specs.TPTSpec


def test_methods_list_shows_the_registry(meanview: type[MeanView]) -> None:
    from cli.main import app

    result = CliRunner().invoke(app, ["methods", "list", "--json"])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    assert [e["name"] for e in entries] == list(method_names())
    by_name = {e["name"]: e for e in entries}
    assert by_name["tpt"]["reference"] == "azshue/TPT" and by_name["tpt"]["defaults"]["n_views"] == 64
    assert by_name["meanview-test"]["kind"] == "forward-only"
    table = CliRunner().invoke(app, ["methods", "list"])
    assert table.exit_code == 0 and all(name in table.output for name in method_names())


def test_readme_method_table_is_the_registry() -> None:
    """The README's method table lists every registered method with its kind and reference, and nothing else."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Methods and the feature store", 1)[1].split("**Stored features.**", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `")]
    table = {cells[0].strip().strip("`"): (cells[1].strip(), cells[3].strip()) for cells in rows}
    expected = {m.name: (m.kind, f"[{m.reference}](https://github.com/{m.reference})") for m in registered()
                if m.name != "meanview-test"}
    assert table == expected


def test_bad_feature_options_are_one_line_errors(cli_env: dict[str, str]) -> None:
    from cli.main import app

    result = CliRunner().invoke(app, ["submit", "features", "--dataset", "pics", "--views", "bogus"])
    assert result.exit_code == 2 and "--views" in result.output and "bogus" in result.output
    with pytest.raises(InvalidSpecError) as info:
        method_spec_from("tpt", {"features": "sometimes"})
    assert info.value.argument == "--set features" and info.value.value == "sometimes"
    # At its default the option stays out of the spec, so fingerprints of earlier runs are unchanged.
    assert "features" not in method_spec_from("tpt").to_dict()
    assert method_spec_from("tpt", {"features": "recompute"}).to_dict()["features"] == "recompute"


def test_tune_run_spec_round_trips_typed() -> None:
    spec = run_specs.TuneRunSpec(method=method_spec_from("difftpt", {"steps": "2", "features": "recompute"}),
                             model=ModelSpec(name="RN50", precision="fp32"), dataset_fingerprint="d" * 64,
                             generation_fingerprint="g" * 64, seed=3)
    again = run_specs.TuneRunSpec.from_dict(spec.to_dict())
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert isinstance(again.method, method_specs.DiffTPTSpec) and again.method.steps == 2
    with pytest.raises(InvalidSpecError):
        run_specs.TuneRunSpec.from_dict({**spec.to_dict(), "kind": "generate"})


def test_a_fresh_process_knows_every_registered_method() -> None:
    """Spec parsing in a process that never imported the methods still sees all of them (core loads them)."""
    import subprocess
    import sys

    code = ("import sys; from difftpt_ops.core import method_specs as specs; names = specs.USER_METHODS; "
            "[specs.method_spec_from(n) for n in names]; print(','.join(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert out.split(",") == [name for name in method_names() if name != "meanview-test"]
