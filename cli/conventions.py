"""What every command gets, added once after the groups are mounted: --quiet, --verbose, --format, examples.

Each command's callback is wrapped in a function with the same signature plus the shared flags, so
Typer builds the options from type hints as for any other parameter, and no command module repeats them.
Commands that print data (they take --json) also get `--format table|tsv|csv`.
"""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from collections.abc import Callable
from typing import Annotated, Any

import click
import typer

from cli.common import TableFormat, set_output

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only results and errors (no progress).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also print informational log lines.")]
FormatOpt = Annotated[TableFormat, typer.Option(
    "--format", help="Tables as a rich table, or plain tsv / csv for scripts, with numbers as stored (fractions, "
                     "not percent; --json for JSON).")]

# One or two examples per command, shown at the end of its --help. Keys are command paths.
EXAMPLES: dict[str, list[str]] = {
    "config show": ["difftpt-ops config show", "difftpt-ops config show --json"],
    "db upgrade": ["difftpt-ops db upgrade", "difftpt-ops db upgrade --url postgresql://difftpt@db-host/difftpt"],
    "models make-tiny": ["difftpt-ops models make-tiny ./tiny-models"],
    "models check": ["difftpt-ops models check --model ViT-B-16 --pretrained /weights/ViT-B-16.pt",
                     "difftpt-ops models check --generator /weights/sd-image-variations-diffusers"],
    "data add": ["difftpt-ops data add imagenet-r --root /data/imagenet-r --subset 1000 --seed 0",
                 "difftpt-ops data add photos --root ./photos --format imagefolder"],
    "data list": ["difftpt-ops data list", "difftpt-ops data list --format tsv"],
    "data show": ["difftpt-ops data show imagenet-r", "difftpt-ops data show imagenet-r@2 --json"],
    "data verify": ["difftpt-ops data verify imagenet-r", "difftpt-ops data verify imagenet-r@1 --json"],
    "data import-generated": ["difftpt-ops data import-generated --dataset imagenet-r --root /data/imagenet-r_1k"],
    "submit tune": ["difftpt-ops submit tune --dataset imagenet-r --method difftpt --pretrained openai",
                    "difftpt-ops submit tune --dataset imagenet-r --method tpt --set steps=2 --dry-run"],
    "submit generate": ["difftpt-ops submit generate --dataset imagenet-r",
                        "difftpt-ops submit generate --dataset imagenet-r --per-sample 63 --dry-run"],
    "worker": ["difftpt-ops worker --gpus all", "difftpt-ops worker --gpus 0,1 --queues generate"],
    "status": ["difftpt-ops status", "difftpt-ops status 3 --watch --json > progress.jsonl"],
    "resume": ["difftpt-ops resume 3"],
    "cancel": ["difftpt-ops cancel 3"],
    "runs list": ["difftpt-ops runs list", "difftpt-ops runs list --format csv > runs.csv"],
    "results": ["difftpt-ops results 3 --by-class", "difftpt-ops results 3 --json"],
    "compare": ["difftpt-ops compare 4 2", "difftpt-ops compare 4 2 --json"],
    "export": ["difftpt-ops export 3 --format parquet", "difftpt-ops export 3 --format csv -o run3.csv"],
    "sql": ['difftpt-ops sql "SELECT run_id, method, top1 FROM run_summary"',
            'difftpt-ops sql "SELECT * FROM run_class_accuracy WHERE run_id = 3" --format csv'],
    "mlflow sync": ["difftpt-ops mlflow sync", "difftpt-ops mlflow sync 3", "difftpt-ops mlflow sync --all"],
    "demo": ["difftpt-ops demo", "difftpt-ops -w /tmp/demo demo > demo.log 2>&1"],
    "table": ["difftpt-ops table --model ViT-B-16", "difftpt-ops table --metric top5 --format markdown"],
    "submit features": ["difftpt-ops submit features --dataset imagenet-r --views tpt",
                        "difftpt-ops submit features --dataset imagenet-r --views difftpt --limit 100"],
    "runs show": ["difftpt-ops runs show 3", "difftpt-ops runs show 3 --json | jq .shard_provenance"],
    "methods list": ["difftpt-ops methods list", "difftpt-ops methods list --format tsv"],
}


def install_conventions(app: typer.Typer) -> None:
    """Wrap every command of `app` and its groups (call once, after every group is mounted), and make click's
    own usage errors (an unknown option, a value outside a choice) one line, as every other error here."""
    _install(app, prefix="")
    for usage_error in _usage_error_classes():
        usage_error.show = _show_one_line  # type: ignore[method-assign]


def _usage_error_classes() -> set[type]:
    """click's UsageError, and the copy of click that typer (0.29) bundles and raises from (`typer._click`)."""
    import typer.core

    bundled = getattr(typer.core, "_click", None)
    return {click.exceptions.UsageError, *([bundled.exceptions.UsageError] if bundled is not None else [])}


def _show_one_line(self: Any, file: Any = None) -> None:
    """`error: <what click says> (see `<command> --help`)` on stderr, instead of usage, hint and error lines."""
    hint = f" (see `{self.ctx.command_path} --help`)" if self.ctx is not None else ""
    message = " ".join(self.format_message().split())
    typed = _typed_value(self)
    if typed is not None:  # `--limit=abc: Input should be a valid integer`, as the project's own errors name values
        message = f"{typed}: {' '.join(str(getattr(self, 'message', '')).split())}"
    click.echo(f"error: {message}{hint}", file=file if file is not None else sys.stderr)


def _typed_value(error: Any) -> str | None:
    """`OPTION=VALUE` of a value typer could not convert, whose message leaves the value out (typer's pydantic
    coercion says "Input should be a valid integer" and not what was given); None when the message has it."""
    errors = getattr(error.__cause__, "errors", None)
    opts = getattr(getattr(error, "param", None), "opts", None)
    if not callable(errors) or not opts:
        return None
    try:
        value = errors()[0]["input"]
    except (IndexError, KeyError, TypeError):
        return None
    if not isinstance(value, str) or repr(value) in error.format_message():
        return None
    return f"{max(opts, key=len)}={value}"


def _install(app: typer.Typer, prefix: str) -> None:
    for command in app.registered_commands:
        if command.callback is None or getattr(command.callback, "_conventions", False):
            continue
        name = command.name or command.callback.__name__.replace("_", "-")
        path = f"{prefix}{name}"
        command.callback = _with_shared_options(command.callback)
        if command.epilog is None and path in EXAMPLES:
            command.epilog = _epilog(EXAMPLES[path])
    for group in app.registered_groups:
        if group.typer_instance is not None:
            _install(group.typer_instance, prefix=f"{prefix}{group.name} ")


def _epilog(examples: list[str]) -> str:
    # "\b" keeps click from rewrapping the paragraph: one example per line, as typed.
    return "Examples:\n\n\b\n" + "\n".join(f"  $ {example}" for example in examples)


def _with_shared_options(callback: Callable[..., Any]) -> Callable[..., Any]:
    """The callback with --quiet, --verbose (and --format where it prints data) added to its signature."""
    signature = inspect.signature(callback, eval_str=True)
    hints = typing.get_type_hints(callback, include_extras=True)
    has_format = "--format" in _option_names(hints)
    takes_format = "as_json" in signature.parameters and not has_format
    extra = {"quiet": (QuietOpt, False), "verbose": (VerboseOpt, False)}
    if takes_format:
        extra["table_format"] = (FormatOpt, TableFormat.table)

    @functools.wraps(callback)
    def wrapper(*args: Any, quiet: bool = False, verbose: bool = False,
                table_format: TableFormat = TableFormat.table, **kwargs: Any) -> Any:
        set_output(quiet=quiet, verbose=verbose, table_format=table_format)
        return callback(*args, **kwargs)

    params = list(signature.parameters.values())
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
               for name, (annotation, default) in extra.items()]
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**hints, **{name: annotation for name, (annotation, _) in extra.items()}}
    wrapper._conventions = True  # type: ignore[attr-defined]
    return wrapper


def _option_names(hints: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for hint in hints.values():
        for meta in getattr(hint, "__metadata__", ()):
            names.update(getattr(meta, "param_decls", None) or ())
            default = getattr(meta, "default", None)
            if isinstance(default, str) and default.startswith("--"):
                names.add(default)
    return names
