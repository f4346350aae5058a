"""Views: layout, CLIP preprocessing, and seeding that makes a sample's views identical anywhere."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from difftpt_ops.core.errors import InputError  # noqa: E402
from difftpt_ops.tta.views import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    as_rgb_image,
    build_some_views,
    build_views,
    center_view,
    random_crop_box,
    to_normalised_array,
    view_seed,
)
from tests.unit.tta_support import random_image  # noqa: E402

pytestmark = pytest.mark.unit


def test_layout_and_shapes() -> None:
    """[original, conventional x n, generated x m], each a normalised 3 x 224 x 224 tensor."""
    views = build_views(random_image(0), n_conventional=3, generated=[random_image(1, (64, 64))] * 2, seed=0,
                        sample_key="s")
    assert views.pixels.shape == (6, 3, 224, 224)
    assert views.kinds == ("original",) + ("conventional",) * 3 + ("generated",) * 2


def test_center_view_is_bicubic_resize_and_center_crop() -> None:
    """A uniform grey image maps to exactly (grey - mean) / std after resize + crop."""
    grey = Image.new("RGB", (300, 200), (128, 128, 128))
    view = torch.from_numpy(center_view(grey))
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    assert view.shape == (3, 224, 224)
    assert torch.allclose(view.mean(dim=(1, 2)), expected, atol=1e-5)


def test_normalised_array_is_torchvisions_to_tensor_and_normalize_bit_for_bit() -> None:
    """The lookup table gives exactly torchvision's float32 arithmetic: every level in every channel, and a
    random image (through the numpy path TPT's transforms take)."""
    import numpy as np
    import torchvision.transforms.functional as TF

    every_level = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)
    every_level[..., 1] = every_level[..., 1][::-1]  # channels hold different levels at a pixel
    for image in (Image.fromarray(every_level), random_image(7, (97, 61))):
        expected = TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)
        found = torch.from_numpy(to_normalised_array(image))
        assert found.dtype == expected.dtype and torch.equal(found, expected)


def test_seeded_views_repeat_exactly_and_differ_between_views() -> None:
    """Same (seed, sample_key) gives identical views; views within a sample differ."""
    image = random_image(0)
    a = build_views(image, n_conventional=4, seed=7, sample_key="img-1", augmix=True)
    b = build_views(image, n_conventional=4, seed=7, sample_key="img-1", augmix=True)
    assert torch.equal(a.pixels, b.pixels)
    assert not torch.equal(a.pixels[1], a.pixels[2])
    other = build_views(image, n_conventional=4, seed=7, sample_key="img-2", augmix=True)
    assert not torch.equal(a.pixels[1:], other.pixels[1:])


def test_views_do_not_depend_on_order_or_count() -> None:
    """View i depends only on (seed, sample_key, i): not on other samples run first, nor on n."""
    image_a, image_b = random_image(0), random_image(1)
    first = build_views(image_a, n_conventional=3, seed=0, sample_key="a")
    build_views(image_b, n_conventional=5, seed=0, sample_key="b")
    again = build_views(image_a, n_conventional=6, seed=0, sample_key="a")
    assert torch.equal(first.pixels, again.pixels[:4])


def test_thread_pool_gives_the_same_views() -> None:
    image = random_image(0)
    serial = build_views(image, n_conventional=4, generated=[random_image(1)], seed=0, sample_key="a", augmix=True)
    pooled = build_views(image, n_conventional=4, generated=[random_image(1)], seed=0, sample_key="a", augmix=True,
                         workers=3)
    assert torch.equal(serial.pixels, pooled.pixels) and serial.kinds == pooled.kinds


def test_views_leave_global_rngs_alone() -> None:
    """Building views consumes neither torch's nor Python's global random state."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    build_views(random_image(0), n_conventional=3, seed=0, sample_key=1, augmix=True)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state


def test_view_seed_is_stable_across_processes() -> None:
    """A hash of the text, not Python's salted hash(): pinned so a change is noticed."""
    assert view_seed(0, "a", 1) == view_seed(0, "a", 1)
    assert view_seed(0, "a", 1) != view_seed(0, "a", 2) != view_seed(1, "a", 1)
    assert view_seed(0, "a", 1) == int.from_bytes(__import__("hashlib").sha256(b"0\x1fa\x1f1").digest()[:8],
                                                  "little") & ((1 << 63) - 1)


def test_augmix_changes_pixels_but_keeps_the_crop() -> None:
    """AugMix is applied on top of the same seeded crop, so the two differ but stay correlated."""
    image = random_image(0)
    plain = build_views(image, n_conventional=2, seed=0, sample_key="k").pixels[1:]
    mixed = build_views(image, n_conventional=2, seed=0, sample_key="k", augmix=True).pixels[1:]
    assert not torch.equal(plain, mixed)
    correlation = torch.corrcoef(torch.stack([plain.flatten(), mixed.flatten()]))[0, 1]
    assert correlation > 0.5


def test_random_crop_box_stays_inside_the_image() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_crop_box(40, 30, generator)
        assert 0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= 30 and left + w <= 40


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0)], ids=["torchvision-default", "dmn"])
def test_random_crop_box_draws_what_torchvision_draws(scale: tuple[float, float]) -> None:
    """Same box as torchvision's RandomResizedCrop.get_params from the same random stream, for the default
    area range and DMN's (0.5, 1); with DMN's, no crop covers less than half the image."""
    from torchvision.transforms import RandomResizedCrop

    image = Image.new("RGB", (320, 240))
    areas = []
    for seed in range(100):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, scale=list(scale), ratio=[3.0 / 4.0, 4.0 / 3.0])
        box = random_crop_box(320, 240, torch.Generator().manual_seed(seed), scale)
        assert box == tuple(expected), seed
        areas.append(box[2] * box[3] / (320 * 240))
    assert min(areas) > scale[0] - 0.01
    assert (min(areas) < 0.5) is (scale[0] < 0.5)


def test_crop_scale_reaches_the_views_and_the_store_recipes() -> None:
    """A plan's crop range changes the conventional views (not the original) and their stored recipes; the
    default range adds nothing to a recipe, so features stored before the option existed are found again."""
    from difftpt_ops.storage.features import DEFAULT_CROP_SCALE, view_recipes
    from difftpt_ops.tta.views import CROP_SCALE

    assert DEFAULT_CROP_SCALE == CROP_SCALE
    image = random_image(0, (300, 200))
    wide = build_views(image, n_conventional=3, seed=0, sample_key="k").pixels
    dmn = build_views(image, n_conventional=3, seed=0, sample_key="k", crop_scale=(0.5, 1.0)).pixels
    assert torch.equal(wide[0], dmn[0]) and not torch.equal(wide[1:], dmn[1:])
    default = view_recipes(n_conventional=1, generated_hashes=[], seed=0, augmix=False, resolution=224)
    assert "scale" not in default[1]
    assert view_recipes(n_conventional=1, generated_hashes=[], seed=0, augmix=False, resolution=224,
                        crop_scale=(0.5, 1.0))[1]["scale"] == [0.5, 1.0]


def test_modes_are_converted_and_tensors_accepted() -> None:
    """Grey, RGBA and palette images become RGB; a (3, H, W) tensor is accepted."""
    for mode in ("L", "RGBA", "P"):
        assert as_rgb_image(Image.new(mode, (10, 10))).mode == "RGB"
    assert as_rgb_image(torch.rand(3, 20, 30)).size == (30, 20)


@pytest.mark.parametrize("bad", [torch.rand(2, 3, 8, 8), torch.rand(4, 8, 8), "image.jpg", None])
def test_bad_images_are_input_errors(bad: object) -> None:
    with pytest.raises(InputError) as info:
        build_views(bad, n_conventional=1, seed=0, sample_key=0)
    assert info.value.argument == "image"


def test_bad_generated_image_names_its_index() -> None:
    with pytest.raises(InputError) as info:
        build_views(random_image(0), n_conventional=0, generated=[random_image(1), 3], seed=0, sample_key=0)
    assert info.value.argument == "generated[1]"


def test_some_views_are_the_rows_of_all_views_and_read_only_what_they_need() -> None:
    """build_some_views at any positions, in any order, equals build_views' rows there (AugMix, generated and
    a thread pool included); the source image is loaded only for its own views, generated images only for
    theirs; a position outside the layout is refused."""
    image, generated = random_image(0), [random_image(10 + i, (64, 64)) for i in range(3)]
    full = build_views(image, n_conventional=4, generated=generated, seed=3, sample_key="k", augmix=True).pixels
    loads: list[object] = []

    def load_image() -> Image.Image:
        loads.append("image")
        return image

    def load_generated(indices: list[int]) -> list[Image.Image]:
        loads.append(tuple(indices))
        return [generated[i] for i in indices]

    def some(positions: list[int], workers: int = 1) -> torch.Tensor:
        loads.clear()
        return build_some_views(load_image, load_generated, n_conventional=4, n_generated=3, positions=positions,
                                seed=3, sample_key="k", augmix=True, workers=workers)

    assert torch.equal(some([7, 2, 0, 5], workers=3), full[[7, 2, 0, 5]])
    assert loads == ["image", (0, 2)]
    assert torch.equal(some([6, 7]), full[[6, 7]]) and loads == [(1, 2)]  # generated only: no source image
    assert torch.equal(some([3, 1]), full[[3, 1]]) and loads == ["image"]  # crops only: no generated image
    assert some([]).shape == (0, 3, 224, 224) and loads == []
    with pytest.raises(InputError, match="positions"):
        some([8])
