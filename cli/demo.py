"""`difftpt-ops demo`: the whole pipeline, offline, on tiny random models and bundled photos."""

from __future__ import annotations

import typer

from cli.common import OUTPUT, JsonOpt, engine_of, for_scripts, format_percent, print_json, print_table, settings_of
from difftpt_ops.core.secrets import mask_url


def _pct(value: float | None) -> str | float | None:
    """Percent as the tables print it; with --format tsv|csv the fraction, as stored (scripts read those)."""
    if for_scripts():
        return value
    return "-" if value is None else format_percent(value)


def _print_results(result) -> None:  # type: ignore[no-untyped-def]
    rows = []
    for method, summary in result.results.items():
        views = result.views.get(method, {})
        rows.append([method, summary["run_id"], summary["done"], summary["failed"], _pct(summary["top1"]),
                     _pct(summary["top5"]), _pct(summary["zeroshot_top1"]), _pct(summary["ece"]),
                     f"{summary['mean_seconds'] or 0:.3f}", views.get("views_encoded", 0),
                     views.get("views_read", 0)])
    print_table(f"{result.dataset}: every episodic method on the same samples (top-1 %, ECE %)", [
        "method", "run", "done", "failed", "top-1", "top-5", "zero-shot top-1", "ECE", "s/sample",
        "views encoded", "views read"], rows)
    pairs = [[f"{c['run_a']['method']} vs {c['run_b']['method']}", c["paired_samples"], c["only_a"], c["only_b"],
              _pct(c["difference"]), f"{c['mcnemar_p']:.3g}"] for c in result.comparisons]
    print_table("paired comparison", ["pair", "samples", "only A right", "only B right", "A - B",
                                      "McNemar p"], pairs)


def _print_next_steps(settings, result) -> None:  # type: ignore[no-untyped-def]
    runs = result.run_ids
    ws = settings.workspace
    from difftpt_ops.services.reading.reporting import tracking_enabled

    mlflow = (f"  mlflow ui --backend-store-uri {mask_url(settings.mlflow_tracking_uri)} --port 5000   "
              "# then open http://127.0.0.1:5000" if tracking_enabled(settings)
              else f"  (MLflow is off: DIFFTPT_OPS_MLFLOW_TRACKING_URI={settings.mlflow_tracking_uri})")
    typer.echo(f"""
The accuracies above are MEANINGLESS: the models have tiny random weights. The demo exists to show
the whole system working offline. Look around:

  difftpt-ops -w {ws} runs list
  difftpt-ops -w {ws} results {runs['difftpt']} --by-class
  difftpt-ops -w {ws} compare {runs['difftpt']} {runs['zeroshot']}
  difftpt-ops -w {ws} sql "SELECT run_id, method, done, top1, gain FROM run_summary"
{mlflow}

A real run (GPU, real weights; see README "A real run"):

  difftpt-ops data add imagenet-r --root /data/imagenet-r --subset 1000 --seed 0
  difftpt-ops submit generate --dataset imagenet-r
  difftpt-ops submit tune --dataset imagenet-r --method difftpt --model ViT-B-16 --pretrained openai
""")


def demo(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Run the whole pipeline offline: tiny models, bundled photos, generation, every episodic method."""
    from cli.jobs import progress_bar
    from difftpt_ops.core.errors import InputError
    from difftpt_ops.services.demo import run_demo

    settings = settings_of(ctx)
    if not settings.embedded:
        raise InputError("DIFFTPT_OPS_BROKER_URL", mask_url(settings.broker_url or ""),
                         "the demo runs on the embedded executor; unset the broker URL or use another workspace")
    echo = (lambda _line: None) if as_json or OUTPUT.quiet else typer.echo  # step lines are progress
    result = run_demo(settings, engine_of(ctx), echo=echo, progress=lambda: progress_bar(settings, as_json))
    if as_json:
        print_json({"dataset": result.dataset, "models_dir": str(result.models_dir),
                    "generation_run_id": result.generation_run_id, "run_ids": result.run_ids,
                    "results": result.results, "comparisons": result.comparisons, "views": result.views})
        return
    _print_results(result)
    _print_next_steps(settings, result)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
