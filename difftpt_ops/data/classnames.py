"""Class names and wnid lists shipped with the package (copied from the TPT reference; data, not code).

ImageNet indices are positions in sorted-wnid order, so a torchvision ImageFolder over the 1000 wnid
folders and these lists agree. ImageNet-A and ImageNet-R use 200 of the 1000 classes; their labels are
positions among those 200 (ascending ImageNet index = sorted wnid order), as in the reference.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from difftpt_ops.core.errors import InputError

# Our cross-domain format names -> key in cross_domain_classes.json.
CROSS_DOMAIN_KEYS: dict[str, str] = {
    "flower102": "Flower102",
    "dtd": "DTD",
    "pets": "OxfordPets",
    "cars": "StanfordCars",
    "ucf101": "UCF101",
    "caltech101": "Caltech101",
    "food101": "Food101",
    "sun397": "SUN397",
    "eurosat": "EuroSAT",
    "aircraft": "FGVCAircraft",
}


@cache
def _load(file_name: str) -> dict[str, Any]:
    text = resources.files("difftpt_ops.data").joinpath(file_name).read_text(encoding="utf-8")
    return dict(json.loads(text))


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet wnids in index (sorted) order."""
    return tuple(entry["wnid"] for entry in _load("imagenet_classes.json")["classes"])


def imagenet_names() -> tuple[str, ...]:
    """The 1000 CLIP-style ImageNet class names in index order (duplicates kept as in the reference)."""
    return tuple(entry["name"] for entry in _load("imagenet_classes.json")["classes"])


@cache
def imagenet_index_of_wnid() -> dict[str, int]:
    """wnid -> ImageNet class index."""
    return {wnid: index for index, wnid in enumerate(imagenet_wnids())}


def subset_indices(variant: str) -> tuple[int, ...]:
    """The 200 ImageNet indices of ImageNet-A (`variant="a"`) or ImageNet-R (`"r"`), in label order."""
    key = {"a": "imagenet_a_indices", "r": "imagenet_r_indices"}[variant]
    return tuple(int(i) for i in _load("imagenet_classes.json")[key])


def subset_names(variant: str) -> tuple[str, ...]:
    """Class names of ImageNet-A or -R in label order: the ImageNet names at the subset indices."""
    names = imagenet_names()
    return tuple(names[i] for i in subset_indices(variant))


def subset_wnids(variant: str) -> tuple[str, ...]:
    """wnids of ImageNet-A or -R in label order (sorted, since the indices ascend)."""
    wnids = imagenet_wnids()
    return tuple(wnids[i] for i in subset_indices(variant))


def cross_domain_names(format_name: str) -> tuple[str, ...]:
    """Class names in label order for one of the 10 cross-domain sets (our format name, e.g. `flower102`)."""
    key = CROSS_DOMAIN_KEYS.get(format_name)
    if key is None:
        raise InputError("--format", format_name, "not a cross-domain set")
    return tuple(_load("cross_domain_classes.json")["classes"][key])
