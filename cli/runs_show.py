"""`difftpt-ops runs show RUN`: one run's spec, provenance and the machines its shards ran on."""

from __future__ import annotations

import json
from typing import Any

import typer

from cli.common import JsonOpt, engine_of, parse_run_id, print_json, run_label


def _lines(run: dict[str, Any]) -> list[str]:
    env = run.get("provenance") or {}
    out = [f"run {run['run_id']}: {run_label(run['kind'], run['method'])} on {run['dataset']}, {run['state']} "
           f"({run['done']} done, {run['failed']} failed of {run['num_samples']})",
           f"model: {run.get('model')}" + (f" ({run['pretrained']})" if run.get("pretrained") else "")
           + f", device {run.get('device')}, precision {run.get('precision')}, seed {run.get('seed')}"
           + ("" if run.get("order_seed") is None else f", stream order seed {run['order_seed']}"),
           f"settings (apart from the method's defaults for the dataset): {run.get('settings') or 'none'}",
           f"fingerprint: {run['fingerprint']}",
           "submitted from: " + ", ".join(f"{key}={value}" for key, value in env.items()),
           "shards ran on:"]
    for group in run.get("shard_provenance") or []:
        facts = {key: value for key, value in group.items() if key != "shards"}
        out.append(f"  {len(group['shards'])} shard(s) [{', '.join(map(str, group['shards'][:10]))}"
                   f"{', ...' if len(group['shards']) > 10 else ''}]: "
                   + ", ".join(f"{key}={value}" for key, value in facts.items()))
    if not run.get("shard_provenance"):
        out.append("  (no shard has run yet)")
    generator = run.get("generator")
    if generator is not None:
        settings = generator.get("settings") or {}
        out.append(f"generated images: config {generator['config_id']} ("
                   + ", ".join(f"{key}={value}" for key, value in sorted(settings.items())) + "); "
                   f"{generator['images_made']} made here, {generator['images_imported']} imported"
                   + (" (imported images carry the settings given to `data import-generated`)"
                      if generator["images_imported"] else ""))
    out.append("spec: " + json.dumps(run["spec"], indent=2, sort_keys=True))
    return out


def runs_show(ctx: typer.Context, run: str = typer.Argument(..., metavar="RUN", help="Run id."),
              as_json: JsonOpt = False) -> None:
    """Show one run: its full spec, what produced it (versions, commit, host) and where its shards ran."""
    from difftpt_ops.services.running.status import show_run

    result = show_run(engine_of(ctx), parse_run_id(run))
    if as_json:
        print_json(result)
        return
    typer.echo("\n".join(_lines(result)))
