"""OpenAI weights run with QuickGELU, the activation they were trained with, whatever name the user types."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from difftpt_ops.core.specs import ModelSpec  # noqa: E402
from difftpt_ops.models.clip import activation_of, is_openai_checkpoint, load_clip  # noqa: E402
from difftpt_ops.models.tiny_clip import make_tiny_clip  # noqa: E402

pytestmark = [pytest.mark.unit]


@pytest.fixture(scope="module")
def openai_layout_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random ViT-B/16 weights in OpenAI's state-dict layout, half precision as OpenAI ships them."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    path = tmp_path_factory.mktemp("openai") / "ViT-B-16.pt"
    torch.save({key: value.half() for key, value in model.state_dict().items()}, path)
    return path


def _features(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 224, 224, generator=generator)
    text = open_clip.get_tokenizer("ViT-B-16")(["a photo of a dog."])
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


@pytest.mark.slow
def test_openai_tag_builds_quick_gelu_and_matches_explicit_build(openai_layout_checkpoint: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model ViT-B-16 --pretrained openai` (the tag redirected to a local file) gives the features of the
    same weights built explicitly with QuickGELU, and differs from plain GELU."""
    torch.set_num_threads(2)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: str(
        openai_layout_checkpoint))
    ours = load_clip(ModelSpec(name="ViT-B-16", pretrained="openai"))
    assert ours.activation == "quickgelu"
    explicit = open_clip.create_model("ViT-B-16-quickgelu", pretrained=str(openai_layout_checkpoint)).eval()
    plain = open_clip.create_model("ViT-B-16", pretrained=str(openai_layout_checkpoint)).eval()
    assert activation_of(plain) == "gelu"
    (image, text), (image_ref, text_ref), (image_gelu, text_gelu) = (
        _features(ours.model), _features(explicit), _features(plain))
    torch.testing.assert_close(image, image_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(text, text_ref, rtol=0, atol=1e-6)
    assert (image - image_gelu).abs().max() > 1e-3 and (text - text_gelu).abs().max() > 1e-3


def test_openai_tags_and_files_choose_quick_gelu(tmp_path: Path) -> None:
    """The rule without building big models: every openai tag wants QuickGELU, a LAION tag does not, a
    TorchScript archive (how OpenAI distributes its files) is recognised, a plain state dict is not."""
    from difftpt_ops.models.clip import wants_quick_gelu

    for name in ("ViT-B-16", "RN50", "ViT-L-14"):
        assert wants_quick_gelu(ModelSpec(name=name), name, "openai")
    assert not wants_quick_gelu(ModelSpec(name="ViT-B-16"), "ViT-B-16", "laion2b_s34b_b88k")
    assert not wants_quick_gelu(ModelSpec(name="ViT-B-16", activation="gelu"), "ViT-B-16", "openai")
    assert wants_quick_gelu(ModelSpec(name="ViT-B-16", activation="quickgelu"), "ViT-B-16", None)

    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    plain = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    assert is_openai_checkpoint(scripted) and not is_openai_checkpoint(plain)


def test_local_directory_keeps_its_activation_and_reports_it(tmp_path: Path) -> None:
    """A make-tiny directory is built as its config says; the activation is reported as built."""
    clip = load_clip(ModelSpec(name=str(make_tiny_clip(tmp_path / "clip")), pretrained=None))
    assert clip.activation == activation_of(clip.model)
