"""`models check` on every way to give CLIP weights offline: a checkpoint file, open_clip's hub cache, a folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import open_clip
import pytest

from difftpt_ops.core.errors import NotFoundError
from difftpt_ops.models.clip import WEIGHTS_FILE
from difftpt_ops.models.tiny_clip import TINY_MODEL_CFG, make_tiny_clip
from difftpt_ops.services.models_check import check_clip

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

ARCH = "difftpt-tiny-check"
REPO = "difftpt-test/tiny-clip"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = make_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")
    config = directory.parent / f"{ARCH}.json"
    config.write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(config)  # a registered architecture name, as ViT-B-16 is
    return directory


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_file(tiny: Path) -> None:
    """--model ARCH --pretrained FILE: the file's hash, its parameter count, no network."""
    weights = tiny / WEIGHTS_FILE
    report = check_clip(ARCH, str(weights))
    folder = check_clip(str(tiny), None)
    assert report["source"] == "checkpoint file" and not report["random_weights"]
    assert report["files"] == [{"path": str(weights), "bytes": weights.stat().st_size, "sha256": _sha(weights)}]
    assert report["parameters"] == folder["parameters"] > 1_000_000
    assert report["precision"] == "fp32" and report["activation"] in {"gelu", "quickgelu"}


def test_hub_cache_layout(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--pretrained TAG whose weights sit in the hub cache (copied from an online machine) loads offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(tiny / WEIGHTS_FILE, snapshot / "open_clip_model.safetensors")
    (cache / f"models--{REPO.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, ARCH, {"cached": {"hf_hub": f"{REPO}/"}})
    report = check_clip(ARCH, "cached")
    assert report["source"] == "hub cache (cached)"
    assert [f["sha256"] for f in report["files"]] == [_sha(tiny / WEIGHTS_FILE)]

    shutil.rmtree(cache / f"models--{REPO.replace('/', '--')}")  # not copied: say how to get it, do not fetch
    with pytest.raises(NotFoundError, match=r"--pretrained=cached: weights are not on this machine") as missing:
        check_clip(ARCH, "cached")
    assert "make-tiny" not in str(missing.value) and "--pretrained /path/" in str(missing.value)


def test_generator_alone_checks_only_the_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`models check --generator DIR` (the --help example) checks the pipeline folder without also loading
    ViT-B-16 openai, which a generation-only machine need not have; --model or --pretrained brings CLIP back."""
    from typer.testing import CliRunner

    from cli.main import app
    from difftpt_ops.models.tiny_diffusion import make_tiny_variation_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))  # no cached CLIP weights
    generator = make_tiny_variation_pipeline(tmp_path / "sd")
    alone = CliRunner().invoke(app, ["--workspace", str(tmp_path / "ws"), "models", "check", "--generator",
                                     str(generator), "--json"])
    assert alone.exit_code == 0, alone.output
    assert [report["kind"] for report in json.loads(alone.stdout)] == ["generator"]
    with_clip = CliRunner().invoke(app, ["--workspace", str(tmp_path / "ws"), "models", "check", "--pretrained",
                                         "openai", "--generator", str(generator)])
    assert with_clip.exit_code == 2 and "--pretrained=openai" in with_clip.output
