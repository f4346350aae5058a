"""A small labeled dataset made from the public-domain photos that scikit-image ships (no download).

Each photo gives a few crops at fixed positions, saved as an ImageFolder (one folder per class), so the
demo exercises the real registration path: files on disk, content hashes, class names from folders.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# class name -> skimage.data file names (bundled in the wheel; the fetcher's remote files are not used)
DEMO_PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut.png",),
    "cat": ("chelsea.png",),
    "coffee cup": ("coffee.png",),
    "rocket": ("rocket.jpg",),
    "motorcycle": ("motorcycle_left.png", "motorcycle_right.png"),
    "galaxy": ("hubble_deep_field.jpg",),
    "brick wall": ("brick.png",),
    "grass": ("grass.png",),
}
# Crop boxes as fractions of the photo (left, top, right, bottom): the whole photo and two large crops.
CROPS: tuple[tuple[float, float, float, float], ...] = (
    (0.0, 0.0, 1.0, 1.0),
    (0.0, 0.0, 0.8, 0.8),
    (0.2, 0.2, 1.0, 1.0),
)


def _skimage_data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def _crop(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    width, height = image.size
    left, top, right, bottom = box
    return image.crop((round(left * width), round(top * height), round(right * width), round(bottom * height)))


def write_demo_dataset(root: Path, *, crops_per_photo: int = len(CROPS)) -> int:
    """Write `root/<class>/<photo>_<k>.png`; returns the number of images. Existing files are kept."""
    source_dir = _skimage_data_dir()
    count = 0
    for class_name, files in DEMO_PHOTOS.items():
        folder = Path(root) / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name in files:
            with Image.open(source_dir / file_name) as photo:
                rgb = photo.convert("RGB")
            for k, box in enumerate(CROPS[:crops_per_photo]):
                target = folder / f"{Path(file_name).stem}_{k}.png"
                if not target.exists():
                    _crop(rgb, box).save(target)
                count += 1
    return count
