"""The offline demo: tiny random models, bundled photos, generation, every episodic method, comparison.

Every step goes through the same services a user's commands call, so the demo exercises the real path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings
from difftpt_ops.core.specs import GenerationSpec
from difftpt_ops.models.quiet import silence_library_progress_bars

DEMO_DATASET = "demo-photos"


@dataclass(frozen=True)
class DemoPlan:
    """The demo's sizes: small enough for 2 CPU cores in a few minutes, shaped like the real thing."""

    per_sample: int = 16  # generated variations per photo (the paper uses 63)
    generation_steps: int = 10  # diffusion steps (the paper uses 50)
    tpt_overrides: dict[str, str] = field(default_factory=dict)  # TPT runs with the reference's 64 views
    difftpt_overrides: dict[str, str] = field(default_factory=lambda: {"n_generated": "16"})


@dataclass
class DemoResult:
    dataset: str
    models_dir: Path
    generation_run_id: int
    run_ids: dict[str, int]
    results: dict[str, dict[str, Any]]
    comparisons: list[dict[str, Any]]
    views: dict[str, dict[str, int]] = field(default_factory=dict)  # per method: views encoded, views read


def episodic_methods() -> tuple[str, ...]:
    """Every registered method that adapts to one sample at a time, in registration order (online methods
    carry a state across samples and need an order; the demo leaves them out, and the methods that cannot run
    without a class descriptions file, AWT, since the demo has none)."""
    from difftpt_ops.tta.methods import ONLINE, registered

    return tuple(method.name for method in registered()
                 if method.kind != ONLINE and not method.requires_descriptions)


def _needs_generated(method: str, overrides: dict[str, str]) -> bool:
    from difftpt_ops.core.method_specs import method_spec_from
    from difftpt_ops.tta.methods import get_method

    return get_method(method).views(method_spec_from(method, overrides)).n_generated > 0


Echo = Callable[[str], None]


def _prepare_inputs(settings: Settings, engine: Engine, echo: Echo) -> tuple[Path, dict[str, Any]]:
    from difftpt_ops.data.demo_photos import write_demo_dataset
    from difftpt_ops.models.clip import CONFIG_FILE
    from difftpt_ops.models.tiny import (
        CLIP_SUBDIR,
        DIFFUSION_SUBDIR,
        REWARD_CLIP_SUBDIR,
        make_tiny_models,
        make_tiny_reward_clip,
    )
    from difftpt_ops.services.datasets import register_dataset

    models_dir = settings.workspace / "demo-models"
    if not (models_dir / CLIP_SUBDIR).exists() or not (models_dir / DIFFUSION_SUBDIR).exists():
        echo(f"1/5 writing tiny random-weight models to {models_dir}")
        make_tiny_models(models_dir)
    else:
        echo(f"1/5 tiny random-weight models found in {models_dir}")
    if not (models_dir / REWARD_CLIP_SUBDIR / CONFIG_FILE).exists():  # RLCF's reward model (older demos lack it)
        make_tiny_reward_clip(models_dir)
    data_root = settings.workspace / "demo-data"
    count = write_demo_dataset(data_root)
    report = register_dataset(engine, name=DEMO_DATASET, root=data_root, format="imagefolder")
    echo(f"2/5 dataset {DEMO_DATASET}: {count} photos from scikit-image in {data_root} ({report.get('status', '')})")
    return models_dir, report


def run_demo(settings: Settings, engine: Engine, *, echo: Echo, progress: Callable[[], Any],
             plan: DemoPlan | None = None) -> DemoResult:
    """Run the whole pipeline on the embedded executor and return what the CLI prints.

    `progress` is a context-manager factory giving the executor's progress sink (or None).
    Running it again attaches to the stored runs and does no work twice.
    """
    from difftpt_ops.models.tiny import CLIP_SUBDIR, DIFFUSION_SUBDIR, REWARD_CLIP_SUBDIR
    from difftpt_ops.services.reading.results import compare_runs, run_results
    from difftpt_ops.services.reading.store import run_feature_counts
    from difftpt_ops.services.running.runs import submit_generate, submit_tune
    from difftpt_ops.tta.methods import get_method

    plan = plan or DemoPlan()
    silence_library_progress_bars()  # the demo prints its own steps; per-file bars would bury them
    # 1-2. Models and data.
    models_dir, _ = _prepare_inputs(settings, engine, echo)
    # 3. Generated variations, cached by content: a second demo generates nothing.
    spec = GenerationSpec(model=str(models_dir / DIFFUSION_SUBDIR), revision=None, steps=plan.generation_steps,
                          per_sample=plan.per_sample, scheduler="default", size=64, dtype="fp32")
    echo(f"3/5 generating {plan.per_sample} image variations per photo ({plan.generation_steps} steps)")
    with progress() as sink:
        generation = submit_generate(engine, settings, dataset_ref=DEMO_DATASET, spec=spec, device="cpu",
                                     progress=sink)
    # 4. Every episodic method on the same samples; views shared between methods are encoded once.
    overrides = {"tpt": plan.tpt_overrides, "difftpt": plan.difftpt_overrides}
    run_ids: dict[str, int] = {}
    for method in episodic_methods():
        echo(f"4/5 {method}: adapting and predicting")
        settings_of_method = overrides.get(method, {})
        if get_method(method).needs_reward_model:  # RLCF: the second tiny CLIP scores its proposals
            settings_of_method = {**settings_of_method, "reward_model": str(models_dir / REWARD_CLIP_SUBDIR)}
        with progress() as sink:
            submitted = submit_tune(engine, settings, dataset_ref=DEMO_DATASET, method=method,
                                    model=str(models_dir / CLIP_SUBDIR), pretrained=None,
                                    overrides=settings_of_method, generation_id=(
                                        generation.generation_config_id
                                        if _needs_generated(method, settings_of_method) else None),
                                    device="cpu", progress=sink)
        run_ids[method] = submitted.run_id
    # 5. Results and paired comparisons.
    echo("5/5 comparing")
    results = {method: run_results(engine, run_id) for method, run_id in run_ids.items()}
    pairs = [("tpt", "zeroshot"), ("difftpt", "zeroshot"), ("difftpt", "tpt")]
    comparisons = [compare_runs(engine, run_ids[a], run_ids[b]) for a, b in pairs]
    counts = run_feature_counts(engine, list(run_ids.values()))
    return DemoResult(dataset=DEMO_DATASET, models_dir=models_dir, generation_run_id=generation.run_id,
                      run_ids=run_ids, results=results, comparisons=comparisons,
                      views={method: counts[run_id] for method, run_id in run_ids.items()})
