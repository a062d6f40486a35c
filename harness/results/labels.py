"""From model outputs to predictions: the model's own ids, ObjectNet ids (two ways), names from a file, or a score.

Each map turns an N x C output batch into N `Prediction`s (ids best first and their scores), computed on the
output's device so only the top-k values cross to the host; harness/results/rows.py makes them CSV rows.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from harness.errors import ConfigError, ModelError
from harness.results.label_maps import (
    IMAGENET_NAMES,
    OBJECTNET,
    OBJECTNET_LEGACY,
    OBJECTNET_MAPS,
    check_label_map,
    check_objectnet_topk,
)
from harness.results.rows import Layout, Prediction

IMAGENET_CLASSES = 1000
OBJECTNET_CLASSES = 313
MAPPING_FILE = "imagenet_pytorch_id_to_objectnet_id.json"
IMAGENET_NAMES_FILE = "imagenet_classes.txt"
OBJECTNET_NAMES_FILE = "objectnet_classes.txt"


def _data_text(name: str) -> str:
    return resources.files("harness.data").joinpath(name).read_text(encoding="utf-8")


def imagenet_to_objectnet() -> dict[int, int]:
    """The challenge's 125 PyTorch ImageNet ids -> 113 ObjectNet ids (shipped; a test re-derives it)."""
    return {int(k): int(v) for k, v in json.loads(_data_text(MAPPING_FILE)).items()}


def imagenet_names() -> list[str]:
    """The 1000 ImageNet class names in PyTorch's index order, shortest form ("tabby", not "tabby, tabby cat"):
    shipped, so naming classes needs no torchvision metadata (a test re-derives them)."""
    return [line.split(",")[0].strip() for line in _data_text(IMAGENET_NAMES_FILE).splitlines()]


def objectnet_names() -> list[str]:
    """ObjectNet's 313 class names by ObjectNet id (shipped; a test re-derives them)."""
    return _data_text(OBJECTNET_NAMES_FILE).splitlines()


def _predictions(ids: list[list[str]], scores: torch.Tensor) -> list[Prediction]:
    return [
        Prediction(tuple(row_ids), tuple(row_values)) for row_ids, row_values in zip(ids, scores.tolist(), strict=True)
    ]


class LabelMap:
    """Base: `topk` (id, confidence) pairs per image, written in `layout`. `scorer_ids`: its ids are ones the
    ObjectNet scorer takes (integers in -1..312), so a file of five pairs of them is the challenge's file, held to
    every rule of its scorer whatever the map is called (harness/results/contract.py)."""

    name = "base"
    scorer_ids = False

    def __init__(self, topk: int, softmax: bool) -> None:
        self.topk = topk
        self.softmax = softmax

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        outputs = outputs.float()
        return outputs.softmax(dim=1) if self.softmax else outputs

    def __call__(self, outputs: torch.Tensor) -> list[Prediction]:
        raise NotImplementedError

    @property
    def layout(self) -> Layout:
        return Layout(self.topk)


class TopK(LabelMap):
    """The model's own class ids, or the names from a labels file."""

    name = "none"

    def __init__(
        self, topk: int, softmax: bool, names: list[str] | None = None, name: str = "names", classes: int = 0
    ) -> None:
        super().__init__(topk, softmax)
        self.names = names
        self.scorer_ids = names is None and classes <= OBJECTNET_CLASSES  # ids 0..classes-1
        if names:
            self.name = name

    def __call__(self, outputs: torch.Tensor) -> list[Prediction]:
        values, indices = self.scores(outputs).topk(self.topk, dim=1)
        rows = indices.cpu().tolist()
        lookup = self.names
        ids = [[lookup[i] if lookup else str(i) for i in row] for row in rows]
        return _predictions(ids, values.cpu())


class ObjectNetLegacy(LabelMap):
    """The ObjectNet template exactly: top-k over 1000 ImageNet classes, each id mapped, unmapped -> -1.

    Rows can hold -1 and the same ObjectNet id twice; the confidences are ImageNet probabilities.
    """

    name = OBJECTNET_LEGACY
    scorer_ids = True

    def __init__(self, topk: int, softmax: bool) -> None:
        super().__init__(topk, softmax)
        table = torch.full((IMAGENET_CLASSES,), -1, dtype=torch.long)
        for imagenet_id, objectnet_id in imagenet_to_objectnet().items():
            table[imagenet_id] = objectnet_id
        self.table = table

    def __call__(self, outputs: torch.Tensor) -> list[Prediction]:
        values, indices = self.scores(outputs).topk(self.topk, dim=1)
        ids = [[str(i) for i in row] for row in self.table[indices.cpu()].tolist()]
        return _predictions(ids, values.cpu())


class ObjectNetSummed(LabelMap):
    """Distinct ObjectNet ids ranked by the summed probability of their ImageNet classes.

    Only the 125 ImageNet classes that map to ObjectNet count; a class such as ObjectNet's "Bicycle", which
    several ImageNet classes share, gets their total. With softmax off there are no probabilities to add, so
    each ObjectNet class scores the largest logit among its ImageNet classes.
    """

    name = OBJECTNET
    scorer_ids = True

    def __init__(self, topk: int, softmax: bool) -> None:
        mapping = imagenet_to_objectnet()
        targets = sorted(set(mapping.values()))
        super().__init__(min(topk, len(targets)), softmax)
        columns = sorted(mapping)
        self.columns = torch.tensor(columns)
        self.groups = torch.tensor([targets.index(mapping[c]) for c in columns])
        self.targets = torch.tensor(targets)

    def __call__(self, outputs: torch.Tensor) -> list[Prediction]:
        device = outputs.device
        chosen = self.scores(outputs)[:, self.columns.to(device)]
        groups = self.groups.to(device).expand_as(chosen)
        if self.softmax:
            summed = torch.zeros(chosen.shape[0], len(self.targets), device=device).scatter_add_(1, groups, chosen)
        else:
            empty = torch.full((chosen.shape[0], len(self.targets)), float("-inf"), device=device)
            summed = empty.scatter_reduce_(1, groups, chosen, reduce="amax")
        values, indices = summed.topk(self.topk, dim=1)
        ids = [[str(i) for i in row] for row in self.targets[indices.cpu()].tolist()]
        return _predictions(ids, values.cpu())


class Score(LabelMap):
    """An N x 1 head (a detector or a regressor): one raw score per image; softmax does not apply."""

    name = "score"

    def __init__(self) -> None:
        super().__init__(1, softmax=False)

    def __call__(self, outputs: torch.Tensor) -> list[Prediction]:
        return [Prediction(None, (value,)) for value in outputs.float().reshape(-1).cpu().tolist()]

    @property
    def layout(self) -> Layout:
        return Layout(None)


def class_ids(label_map: LabelMap, num_classes: int) -> list[str]:
    """The id each of the model's classes is written as under `label_map` ("-1" for an ImageNet class ObjectNet
    lacks), so an answer given in those ids can be matched to the classes that count for it."""
    if isinstance(label_map, (ObjectNetSummed, ObjectNetLegacy)):
        mapping = imagenet_to_objectnet()
        return [str(mapping.get(index, -1)) for index in range(num_classes)]
    if isinstance(label_map, TopK) and label_map.names:
        return list(label_map.names)
    return [str(index) for index in range(num_classes)]


def id_names(label_map: LabelMap, num_classes: int) -> dict[str, str]:
    """Names for the ids `label_map` writes, where the harness knows them (a labels file's ids are names)."""
    if isinstance(label_map, (ObjectNetSummed, ObjectNetLegacy)):
        return {str(index): name for index, name in enumerate(objectnet_names())}
    if isinstance(label_map, TopK) and not label_map.names and num_classes == IMAGENET_CLASSES:
        return {str(index): name for index, name in enumerate(imagenet_names())}
    return {}


def read_labels_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read labels file {path}: {error}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names or any(not name for name in names):
        raise ConfigError(f"labels file {path} must hold one non-empty name per line")
    return names


def make_label_map(
    label_map: str, num_classes: int, topk: int, softmax: bool, model_names: list[str] | None = None
) -> tuple[LabelMap, list[str]]:
    """The label map for a model with `num_classes` outputs, and any warnings worth printing. `model_names` are
    the class names the model carries (Hugging Face's id2label): `auto` writes them for a head that is not
    ImageNet's."""
    warnings: list[str] = []
    if num_classes < 1:
        raise ModelError("the model outputs 0 classes: it must return N x C scores with C >= 1")
    if num_classes == 1 and label_map in ("auto", "none"):
        return Score(), warnings
    check_label_map(label_map)
    if label_map in OBJECTNET_MAPS or (label_map == "auto" and num_classes == IMAGENET_CLASSES):
        if num_classes != IMAGENET_CLASSES:
            raise ConfigError(
                f"label map {label_map} needs a 1000-class ImageNet head, but the model outputs {num_classes} "
                "classes: use --label-map none or a labels file"
            )
        check_objectnet_topk(label_map if label_map != "auto" else ObjectNetSummed.name, topk)
        if label_map == ObjectNetLegacy.name:
            return ObjectNetLegacy(topk, softmax), warnings
        return ObjectNetSummed(topk, softmax), warnings
    names = model_names if label_map == "auto" and model_names and len(model_names) == num_classes else None
    if label_map == IMAGENET_NAMES:
        if num_classes != IMAGENET_CLASSES:
            raise ConfigError(
                f"label map {label_map} names a 1000-class ImageNet head's classes, but the model outputs "
                f"{num_classes}: use --label-map none or a labels file"
            )
        names = imagenet_names()
    elif label_map not in ("auto", "none"):
        path = Path(label_map)
        names = read_labels_file(path)
        if len(names) != num_classes:
            raise ConfigError(f"labels file {path} has {len(names)} names but the model outputs {num_classes} classes")
    if topk > num_classes:
        warnings.append(f"topk {topk} is more than the model's {num_classes} classes: writing {num_classes}")
    shown = IMAGENET_NAMES if label_map == IMAGENET_NAMES else "names"
    return TopK(min(topk, num_classes), softmax, names, shown, num_classes), warnings
