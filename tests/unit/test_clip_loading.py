"""load_clip: the tiny model round-trips bit-exactly; missing or unreachable models fail clearly and fast."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from difftpt_ops.core.errors import InvalidSpecError, NotFoundError, ServiceUnavailableError  # noqa: E402
from difftpt_ops.core.specs import ModelSpec  # noqa: E402
from difftpt_ops.models.clip import WEIGHTS_FILE, load_clip, read_coop_checkpoint  # noqa: E402
from difftpt_ops.models.tiny_clip import TINY_MODEL_CFG, make_tiny_clip  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def test_tiny_clip_round_trips_bit_exactly(tiny_dir: Path) -> None:
    """The saved state dict equals a fresh build with the same seed, and loading gives it back exactly."""
    from safetensors.torch import load_file

    saved = load_file(str(tiny_dir / WEIGHTS_FILE))
    loaded = load_clip(ModelSpec(name=str(tiny_dir), pretrained=None)).model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


def test_make_tiny_clip_is_seeded_fast_and_leaves_global_rng(tmp_path: Path) -> None:
    """Same seed, same weights; under a second to build; the global RNG state is not consumed."""
    from safetensors.torch import load_file

    state = torch.get_rng_state()
    start = time.perf_counter()
    make_tiny_clip(tmp_path / "a", seed=3)
    assert time.perf_counter() - start < 1.0
    make_tiny_clip(tmp_path / "b", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    a, b = load_file(str(tmp_path / "a" / WEIGHTS_FILE)), load_file(str(tmp_path / "b" / WEIGHTS_FILE))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_loaded_model_is_frozen_fp32_on_cpu(tiny_dir: Path) -> None:
    """precision auto is fp32 on CPU; eval mode; no parameter requires grad; facts are filled in."""
    clip = load_clip(ModelSpec(name=str(tiny_dir), pretrained=None))
    assert clip.precision == "fp32" and clip.dtype == torch.float32
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert (clip.embed_dim, clip.context_length, clip.image_size) == (TINY_MODEL_CFG["embed_dim"], 77, 224)
    assert clip.tokenizer(["a photo of a dog."]).shape == (1, 77)


def test_local_checkpoint_file_as_pretrained(tiny_dir: Path, tmp_path: Path) -> None:
    """A registered architecture name with --pretrained pointing at a weights file loads that file."""
    config = tmp_path / "difftpt-tiny-test.json"
    config.write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(config)
    clip = load_clip(ModelSpec(name="difftpt-tiny-test", pretrained=str(tiny_dir / WEIGHTS_FILE)))
    reference = load_clip(ModelSpec(name=str(tiny_dir), pretrained=None)).model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in clip.model.state_dict().items())


def test_missing_local_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as info:
        load_clip(ModelSpec(name=str(tmp_path / "nope"), pretrained=None))
    assert info.value.argument == "--model"


def test_directory_without_config_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="open_clip_config.json"):
        load_clip(ModelSpec(name=str(tmp_path), pretrained=None))


def test_damaged_weights_are_bad_input_naming_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    """A truncated safetensors file in a model directory, or a checkpoint file that is not one: one
    InvalidSpecError (bad input, so a worker does not retry it) naming the argument, not a library traceback."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_dir, damaged)
    weights = damaged / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InvalidSpecError, match=r"--model=.*damaged: its weights cannot be read"):
        load_clip(ModelSpec(name=str(damaged), pretrained=None))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InvalidSpecError, match=r"--pretrained=.*junk.pt: its weights cannot be read"):
        load_clip(ModelSpec(name="RN50", pretrained=str(junk)))


def test_unknown_pretrained_tag_is_not_found() -> None:
    with pytest.raises(NotFoundError) as info:
        load_clip(ModelSpec(name="ViT-B-16", pretrained="no-such-tag"))
    assert info.value.argument == "--pretrained"


def test_hub_weights_offline_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE=1 and an empty cache, a hub tag fails at once with a hint to pass a directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ServiceUnavailableError, match="local directory"):
        load_clip(ModelSpec(name="ViT-B-16", pretrained="openai"), cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10.0


def test_read_coop_checkpoint(tmp_path: Path) -> None:
    """A CoOp-style checkpoint reads back; a missing or foreign file is a clear error."""
    path = tmp_path / "coop.pth"
    torch.save({"state_dict": {"ctx": torch.ones(4, 8)}, "epoch": 50}, path)
    assert torch.equal(read_coop_checkpoint(path)["state_dict"]["ctx"], torch.ones(4, 8))
    with pytest.raises(NotFoundError):
        read_coop_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(InvalidSpecError):
        read_coop_checkpoint(tmp_path / "junk.pth")


def _registered_tiny_name(tmp_path: Path, name: str = "difftpt-tiny-test") -> str:
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(config)
    return name


class _OpenAILayout(torch.nn.Module):
    """A CLIP's modules and parameters under OpenAI's names, plus the buffers OpenAI's archives carry."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, parameter in model.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))
        self._model = [model]

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._model[0].encode_image(image), self._model[0].encode_text(text)


def test_openai_torchscript_archive_loads_with_quick_gelu(tiny_dir: Path, tmp_path: Path) -> None:
    """OpenAI distributes TorchScript archives (ViT-B-16.pt): `--pretrained FILE.pt` loads one with its
    weights and QuickGELU, not a torch.load weights_only refusal."""
    import warnings

    name = _registered_tiny_name(tmp_path)
    reference = load_clip(ModelSpec(name=str(tiny_dir), pretrained=None, activation="quickgelu")).model
    archive = tmp_path / "ViT-tiny.pt"
    image = torch.zeros(1, 3, 224, 224)
    text = open_clip.get_tokenizer("ViT-B-16")(["a dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(_OpenAILayout(reference), (image, text), check_trace=False), str(archive))
    clip = load_clip(ModelSpec(name=name, pretrained=str(archive)))
    assert clip.activation == "quickgelu"
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in clip.model.state_dict().items())


def test_truncated_torch_checkpoint_is_bad_input(tiny_dir: Path, tmp_path: Path) -> None:
    """A partly downloaded .pt (torch.save's zip, cut short) is one InvalidSpecError naming --pretrained,
    not torch's RuntimeError (which a worker would retry and the CLI would print as a traceback)."""
    from safetensors.torch import load_file

    name = _registered_tiny_name(tmp_path)
    full = tmp_path / "full.pt"
    torch.save(load_file(str(tiny_dir / WEIGHTS_FILE)), full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InvalidSpecError, match=r"--pretrained=.*cut.pt: its weights cannot be read") as info:
        load_clip(ModelSpec(name=name, pretrained=str(cut)))
    assert "\n" not in str(info.value)


def test_checkpoint_of_another_architecture_is_one_line(tmp_path: Path) -> None:
    """Weights of another architecture: one line naming --pretrained, with counts of the keys that differ."""
    name = _registered_tiny_name(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "text_projection": torch.zeros(2, 2)}, other)
    with pytest.raises(InvalidSpecError, match=r"--pretrained=.*other.pt: does not fit") as info:
        load_clip(ModelSpec(name=name, pretrained=str(other)))
    assert "\n" not in str(info.value) and "missing keys" in str(info.value)
