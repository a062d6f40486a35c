"""The label maps a run may name, and the rules a map puts on the other settings: torch-free, so the settings are
checked before anything heavy loads (harness/sources.py) and the maps themselves (labels.py) follow the same words.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import ConfigError

OBJECTNET = "objectnet"  # ImageNet scores summed into ObjectNet classes (the default for an ImageNet head)
OBJECTNET_LEGACY = "objectnet-legacy"  # the template's mapping of the top ImageNet ids, kept to reproduce it
IMAGENET_NAMES = "imagenet-names"  # the ImageNet class names instead of ids
LABEL_MAPS = ("auto", "none", OBJECTNET, OBJECTNET_LEGACY, IMAGENET_NAMES)
OBJECTNET_MAPS = (OBJECTNET, OBJECTNET_LEGACY)  # the maps whose files the ObjectNet scorer reads
OBJECTNET_TOPK = 5  # it reads exactly five (id, confidence) pairs a row (harness/results/contract.py)


def is_named_map(label_map: str) -> bool:
    """One of LABEL_MAPS, rather than a labels file's path."""
    return label_map in LABEL_MAPS


def check_label_map(label_map: str) -> None:
    """A label map is one of LABEL_MAPS or a labels file: a typo is refused before the model loads."""
    if not is_named_map(label_map) and not Path(label_map).is_file():
        raise ConfigError(f"--label-map {label_map}: not one of {', '.join(LABEL_MAPS)}, nor a labels file")


def check_objectnet_topk(label_map: str, topk: int) -> None:
    """An ObjectNet file the scorer can read: exactly five pairs a row."""
    if label_map in OBJECTNET_MAPS and topk != OBJECTNET_TOPK:
        raise ConfigError(
            f"--topk {topk} with the {label_map} label map: the ObjectNet scorer reads exactly {OBJECTNET_TOPK} "
            "(id, confidence) pairs a row. Use --topk 5, or --label-map none for the model's own ids"
        )
