"""Class descriptions files: sentences per class name (CuPL-style, e.g. GPT-written), averaged in with the
prompt texts of methods whose spec has a `descriptions` field (those that take `prompts`: zero-shot, ZERO,
MTA, TDA, DMN-ZS, DPE, BoostAdapter); AWT needs one and keeps each sentence's prompt apart.

The user names a JSON file at submit (`--set descriptions=FILE`): an object mapping class names (underscores
as spaces, the names the dataset prompts with) to lists of sentences. Submit checks that it covers every
class of the dataset, stores its canonical JSON in the artifact store under its sha256 and writes the key,
"sha256:<hex>", into the spec: the run's identity is the text, not the path, and a worker on another machine
reads it from the shared store. A stored key can be given instead of a path (a resubmit, a sweep).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import InputError
from difftpt_ops.core.method_specs import DESCRIPTIONS_KEY, MethodSpec, missing_descriptions, prompt_has_text

NAMESPACE = "descriptions"
SUFFIX = ".json"
KEY_PREFIX = "sha256:"
ARGUMENT = "--set descriptions"  # as typed; a sweep over files names it --sweep descriptions (sweeps.py)


@dataclass(frozen=True)
class Descriptions:
    """A descriptions file's content, its canonical bytes and the key they are stored under."""

    by_class: dict[str, list[str]]
    data: bytes
    key: str  # "sha256:<hex>"


def _store(settings: Settings) -> Any:
    from difftpt_ops.storage.artifacts import ArtifactStore

    return ArtifactStore(settings.artifact_root, namespace=NAMESPACE)


def _artifact_key(key: str) -> str:
    return f"{key.removeprefix(KEY_PREFIX)}{SUFFIX}"


def parse_descriptions(raw: bytes, source: str) -> Descriptions:
    """Validate a descriptions file's bytes: a JSON object of class name -> non-empty list of strings.

    Raises:
        InputError: naming the file, for anything else.
    """
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(ARGUMENT, source, f"is not a JSON file ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or not payload:
        raise InputError(ARGUMENT, source, "must hold a JSON object mapping class names to lists of sentences")
    for name, sentences in payload.items():
        if not (isinstance(sentences, list) and sentences and all(isinstance(s, str) and s.strip()
                                                                  for s in sentences)):
            raise InputError(ARGUMENT, source, f"class {name!r} must map to a non-empty list of non-empty strings")
    by_class = {str(name): list(sentences) for name, sentences in payload.items()}
    data = json.dumps(by_class, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Descriptions(by_class, data, KEY_PREFIX + hashlib.sha256(data).hexdigest())


def check_covers(by_class: Mapping[str, Sequence[str]], class_names: Sequence[str], source: str) -> None:
    """Every class the dataset prompts with has descriptions (its name with underscores as spaces)."""
    missing = missing_descriptions(by_class, class_names)
    if missing:
        shown = ", ".join(repr(name) for name in missing[:3])  # as the file must key them
        raise InputError(ARGUMENT, source, f"has no descriptions for {len(missing)} of the dataset's "
                                           f"{len(class_names)} classes (e.g. {shown})")


def read_file(path: str) -> Descriptions:
    file = Path(path).expanduser()
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise InputError(ARGUMENT, path, f"cannot be read ({exc.strerror or exc.__class__.__name__})") from exc
    return parse_descriptions(raw, path)


def load_descriptions(settings: Settings, key: str) -> dict[str, list[str]]:
    """The stored descriptions under `key`, checked against it.

    Raises:
        InputError: no such stored file, or one whose bytes no longer match their key.
    """
    if not DESCRIPTIONS_KEY.match(key):
        raise InputError(ARGUMENT, key, "is not a stored descriptions key (sha256:<64 hex digits>); pass the "
                                        "JSON file's path at submit")
    try:
        raw = _store(settings).read_bytes(_artifact_key(key))
    except FileNotFoundError as exc:
        raise InputError(ARGUMENT, key, f"is not in the artifact store ({settings.artifact_root}); submit "
                                        "with the JSON file's path to store it again") from exc
    loaded = parse_descriptions(raw, key)
    if loaded.key != key:
        raise InputError(ARGUMENT, key, "the stored file was changed since it was stored (its sha256 differs); "
                                        "submit with the JSON file's path to store it again")
    return loaded.by_class


def descriptions_by_class(settings: Settings, key: str, data: bytes | None) -> dict[str, list[str]]:
    """The class -> sentences mapping of a `checked_descriptions` result: parsed from its bytes when they are
    still to be stored, else read from the store under its key."""
    return parse_descriptions(data, key).by_class if data is not None else load_descriptions(settings, key)


def checked_descriptions(settings: Settings, value: str, class_names: Sequence[str]) -> tuple[str, bytes | None]:
    """(key, canonical bytes to store) of a descriptions value, a file's path or a stored key (bytes None),
    checked to cover every class. Reads only."""
    if DESCRIPTIONS_KEY.match(value):
        check_covers(load_descriptions(settings, value), class_names, value)
        return value, None
    loaded = read_file(value)
    check_covers(loaded.by_class, class_names, value)
    return loaded.key, loaded.data


def check_has_prompt_text(spec: MethodSpec) -> None:
    """Descriptions are averaged with the class prompts' texts: refuse a spec whose prompt has none (the single
    prompt with a random or CoOp context). Call it on the spec as the dataset resolves it (DMN's, TDA's
    per-dataset prompts)."""
    value = getattr(spec, "descriptions", None)
    if value is not None and not prompt_has_text(spec):
        raise InputError(ARGUMENT, value, "are averaged with the prompt's text, and a random or CoOp context has "
                                          "none: choose a template set (--set prompts=tip) or a prompt.ctx_init")


def resolve_descriptions(settings: Settings, spec: MethodSpec, class_names: Sequence[str]) -> tuple[MethodSpec,
                                                                                                  bytes | None]:
    """The spec with a descriptions path replaced by its key, and the bytes to store (None: nothing to store).

    Reads and checks only; `store_descriptions` writes, so a dry run stores nothing. The method's own check
    runs too (`Method.check_descriptions`: AWT refuses no file, or too few sentences per class).
    """
    value = getattr(spec, "descriptions", None)
    if value is None:
        check_method_descriptions(spec, None, class_names)
        return spec, None
    check_has_prompt_text(spec)
    key, data = checked_descriptions(settings, value, class_names)
    check_method_descriptions(spec, descriptions_by_class(settings, key, data), class_names)
    return dataclasses.replace(spec, descriptions=key), data  # type: ignore[call-arg]


def check_method_descriptions(spec: MethodSpec, by_class: Mapping[str, Sequence[str]] | None,
                              class_names: Sequence[str]) -> None:
    """The method's own check of the descriptions it is given (None: none), for a registered method."""
    from difftpt_ops.core.method_specs import CORE_METHODS

    if spec.method in CORE_METHODS:
        return
    from difftpt_ops.tta.methods import find_method

    method = find_method(spec.method)
    if method is None:
        return
    try:
        method.check_descriptions(spec, by_class, class_names)
    except InputError as exc:  # the method names its spec's field: name the option, as the user typed it
        if exc.argument.startswith("-"):
            raise
        raise type(exc)(f"--set {exc.argument}", exc.value, exc.problem) from None


def store_descriptions(settings: Settings, key: str, data: bytes) -> None:
    """Write a descriptions file's canonical bytes under its key (atomic). A stored copy whose bytes no longer
    match the key (edited by hand) is replaced: the bytes are the key's by construction."""
    store, name = _store(settings), _artifact_key(key)
    if store.put(name, data).sha256 != key.removeprefix(KEY_PREFIX):
        store.path(name).unlink(missing_ok=True)
        store.put(name, data)


def descriptions_for(settings: Settings, spec: Any) -> Mapping[str, Sequence[str]] | None:
    """What the engine needs for a stored spec: the descriptions it names, or None."""
    key = getattr(spec, "descriptions", None)
    return None if key is None else load_descriptions(settings, key)
