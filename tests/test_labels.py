"""Label maps: the shipped ObjectNet mapping re-derived from the official files, and each map's behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.errors import ConfigError, ModelError
from harness.results.label_maps import check_objectnet_topk
from harness.results.labels import (
    ObjectNetLegacy,
    ObjectNetSummed,
    Score,
    TopK,
    class_ids,
    id_names,
    imagenet_names,
    imagenet_to_objectnet,
    make_label_map,
    objectnet_names,
)
from harness.results.rows import Prediction
from tests.helpers import SAMPLES, shared_file

MAPPING = imagenet_to_objectnet()


def test_shipped_mapping_equals_the_official_chain() -> None:
    """pytorch id -> ImageNet label (official order) -> ObjectNet label -> id (index in sorted labels)."""
    folder = shared_file("objectnet-mappings")
    pytorch_to_line = json.loads((folder / "pytorch_to_imagenet_2012_id.json").read_text())
    imagenet_labels = (folder / "imagenet_to_label_2012_v2").read_text().splitlines()
    objectnet_to_imagenet = json.loads((folder / "objectnet_to_imagenet_1k.json").read_text())
    objectnet_labels = sorted(json.loads((folder / "folder_to_objectnet_label.json").read_text()).values())
    label_to_objectnet_id = {label: index for index, label in enumerate(objectnet_labels)}
    imagenet_label_to_objectnet_id = {
        imagenet_label: label_to_objectnet_id[objectnet_label]
        for objectnet_label, joined in objectnet_to_imagenet.items()
        for imagenet_label in joined.split("; ")
    }
    derived = {}
    for pytorch_id, line in pytorch_to_line.items():
        label = imagenet_labels[int(line)]
        if label in imagenet_label_to_objectnet_id:
            derived[int(pytorch_id)] = imagenet_label_to_objectnet_id[label]
    assert derived == MAPPING
    assert len(MAPPING) == 125 and len(set(MAPPING.values())) == 113


def _logits(*hot: tuple[int, float]) -> torch.Tensor:
    logits = torch.full((1, 1000), -20.0)
    for index, value in hot:
        logits[0, index] = value
    return logits


def _ids(prediction: Prediction) -> list[int]:
    assert prediction.ids is not None
    return [int(x) for x in prediction.ids]


def test_legacy_maps_each_imagenet_id_and_writes_minus_one_for_the_rest() -> None:
    mapped = sorted(MAPPING)
    unmapped = next(i for i in range(1000) if i not in MAPPING)
    (row,) = ObjectNetLegacy(5, softmax=True)(_logits((mapped[0], 9), (unmapped, 8), (mapped[1], 7), (mapped[2], 6)))
    ids = _ids(row)
    assert ids[:4] == [MAPPING[mapped[0]], -1, MAPPING[mapped[1]], MAPPING[mapped[2]]]
    assert row.scores[0] > row.scores[1] > row.scores[2]
    assert row.scores[0] == pytest.approx(float(torch.tensor([9.0, 8, 7, 6]).softmax(0)[0]), rel=1e-3)
    (raw,) = ObjectNetLegacy(5, softmax=False)(_logits((mapped[0], 9), (unmapped, 8)))
    assert raw.scores[:2] == (9.0, 8.0)


def test_a_one_score_head_writes_its_raw_value_whatever_topk_and_softmax_say() -> None:
    """A detector's or regressor's N x 1 output: one raw value a row, never softmaxed (softmax over one class is
    1.0 for every image), and --save-probs records it as raw for the ensemble tool."""
    for topk, softmax in ((5, True), (3, False)):
        head, _ = make_label_map("auto", 1, topk, softmax)
        assert isinstance(head, Score) and (head.topk, head.softmax) == (1, False)
        assert head(torch.tensor([[2.5], [-1.0]])) == [Prediction(None, (2.5,)), Prediction(None, (-1.0,))]


def test_a_labels_file_holds_one_name_a_line_and_says_so_when_not(tmp_path: Path) -> None:
    names = tmp_path / "labels.txt"
    names.write_text("café\n  dog \n\n\n", encoding="utf-8")
    assert make_label_map(str(names), 2, 1, True)[0].names == ["café", "dog"]
    for bad in ("cat\n\ndog\n", "\n\n", ""):
        names.write_text(bad, encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"^labels file {names} must hold one non-empty name per line$"):
            make_label_map(str(names), 2, 1, True)
    names.write_bytes(b"caf\xe9\ndog\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=rf"^cannot read labels file {names}: 'utf-8' codec can't decode"):
        make_label_map(str(names), 2, 1, True)


def test_summed_map_adds_the_probabilities_of_shared_classes() -> None:
    groups: dict[int, list[int]] = {}
    for imagenet_id, objectnet_id in MAPPING.items():
        groups.setdefault(objectnet_id, []).append(imagenet_id)
    shared_id, members = next((k, v) for k, v in groups.items() if len(v) >= 2)
    single = next(i for i in MAPPING if len(groups[MAPPING[i]]) == 1)
    unmapped = next(i for i in range(1000) if i not in MAPPING)
    # one single class at 5.0 beats each member (4.5) alone, but not the two members together
    logits = _logits((single, 5.0), (members[0], 4.5), (members[1], 4.5), (unmapped, 10.0))
    (row,) = ObjectNetSummed(5, softmax=True)(logits)
    ids = _ids(row)
    assert ids[:2] == [shared_id, MAPPING[single]]
    assert len(set(ids)) == 5 and all(0 <= i <= 312 for i in ids)
    probabilities = logits.softmax(1)[0]
    assert row.scores[0] == pytest.approx(float(probabilities[members[0]] + probabilities[members[1]]), rel=1e-5)
    (row,) = ObjectNetSummed(5, softmax=False)(logits)  # no probabilities: the best logit of each class
    assert _ids(row)[0] == MAPPING[single] and row.scores[0] == pytest.approx(5.0)


def test_topk_with_names_and_score_head(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n\n")
    label_map, _ = make_label_map(str(labels), 3, 2, softmax=False)
    assert isinstance(label_map, TopK)
    (prediction,) = label_map(torch.tensor([[0.1, 2.0, 1.0]]))
    assert label_map.layout.format("a.png", prediction) == ["a.png", "dog", "2", "bird", "1"]
    score, _ = make_label_map("auto", 1, 5, softmax=True)
    assert isinstance(score, Score)
    rows = [score.layout.format("k", p) for p in score(torch.tensor([[0.25], [-3.0]]))]
    assert rows == [["k", "0.25"], ["k", "-3"]]
    assert score.layout.failure("k") == ["k", ""] and score.layout.columns == 2


def test_label_map_choice_and_errors(tmp_path: Path) -> None:
    assert isinstance(make_label_map("auto", 1000, 5, True)[0], ObjectNetSummed)
    assert isinstance(make_label_map("objectnet-legacy", 1000, 5, True)[0], ObjectNetLegacy)
    assert isinstance(make_label_map("auto", 10, 5, True)[0], TopK)
    label_map, warnings = make_label_map("none", 3, 5, True)
    assert label_map.topk == 3 and "writing 3" in warnings[0]
    assert label_map.layout.failure("k") == ["k", *["", "0"] * 3] and label_map.layout.columns == 7
    for label_map in ("auto", "objectnet", "objectnet-legacy"):  # the scorer reads exactly five pairs
        for topk in (1, 4, 6, 200):
            with pytest.raises(ConfigError, match="reads exactly 5"):
                make_label_map(label_map, 1000, topk, True)
    assert make_label_map("auto", 1000, 5, True)[1] == []
    with pytest.raises(ModelError, match="0 classes"):
        make_label_map("none", 0, 5, True)
    with pytest.raises(ConfigError, match="needs a 1000-class"):
        make_label_map("objectnet", 10, 5, True)
    with pytest.raises(ConfigError, match="nor a labels file"):
        make_label_map("objectnot", 10, 5, True)
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match="has 2 names but the model outputs 10"):
        make_label_map(str(tmp_path / "two.txt"), 10, 5, True)


def test_a_misspelt_label_map_is_refused_before_the_model_loads(tmp_path: Path, capsys) -> None:
    output = tmp_path / "out" / "p.csv"
    assert main([str(SAMPLES), str(output), "--label-map", "objectnot", "--model", "timm:no_such_model"]) == 2
    assert "--label-map objectnot: not one of auto, none, objectnet, objectnet-legacy" in capsys.readouterr().err
    assert not output.parent.exists()


def test_another_topk_with_an_objectnet_map_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        check_objectnet_topk("objectnet", 3)
    assert str(caught.value) == (
        "--topk 3 with the objectnet label map: the ObjectNet scorer reads exactly 5 (id, confidence) pairs a row. "
        "Use --topk 5, or --label-map none for the model's own ids"
    )
    check_objectnet_topk("objectnet", 5)
    check_objectnet_topk("none", 3)


def test_the_names_check_shows_for_each_id_are_objectnets_imagenets_or_none() -> None:
    objectnet = id_names(make_label_map("objectnet", 1000, 5, True)[0], 1000)
    assert objectnet == {str(index): name for index, name in enumerate(objectnet_names())} and len(objectnet) == 313
    assert id_names(make_label_map("objectnet-legacy", 1000, 5, True)[0], 1000) == objectnet
    imagenet = id_names(make_label_map("none", 1000, 5, True)[0], 1000)
    assert len(imagenet) == 1000 and imagenet["967"] == "espresso" and imagenet["0"] == imagenet_names()[0]
    assert id_names(make_label_map("none", 10, 5, True)[0], 10) == {}
    assert id_names(make_label_map("imagenet-names", 1000, 5, True)[0], 1000) == {}  # its ids are the names
    assert id_names(make_label_map("auto", 1, 5, True)[0], 1) == {}


def test_the_ids_each_class_is_written_as_and_when_they_are_the_scorers(tmp_path: Path) -> None:
    """A plain head's ids are 0..C-1: the scorer's kind while C <= 313 (held to its rules), not beyond; a labels
    file's ids are its names; ObjectNet's maps write each ImageNet class's ObjectNet id, -1 where it has none."""
    assert make_label_map("none", 313, 5, True)[0].scorer_ids is True
    assert make_label_map("none", 314, 5, True)[0].scorer_ids is False
    assert class_ids(make_label_map("none", 3, 5, True)[0], 3) == ["0", "1", "2"]
    names = tmp_path / "labels.txt"
    names.write_text("cat\ndog\n", encoding="utf-8")
    named = make_label_map(str(names), 2, 1, True)[0]
    assert (named.scorer_ids, named.name, class_ids(named, 2)) == (False, "names", ["cat", "dog"])
    assert make_label_map("imagenet-names", 1000, 5, True)[0].name == "imagenet-names"
    mapped = class_ids(make_label_map("objectnet", 1000, 5, True)[0], 1000)
    unmapped = next(index for index in range(1000) if index not in MAPPING)
    assert mapped[unmapped] == "-1" and all(mapped[index] == str(MAPPING[index]) for index in MAPPING)
    assert class_ids(make_label_map("objectnet-legacy", 1000, 5, True)[0], 1000) == mapped


def test_each_label_map_a_head_gets_with_its_settings_and_every_refusal_word_for_word(tmp_path: Path) -> None:

    with pytest.raises(ModelError) as none:
        make_label_map("auto", 0, 5, True)
    assert str(none.value) == "the model outputs 0 classes: it must return N x C scores with C >= 1"
    for name in ("auto", "none"):
        assert isinstance(make_label_map(name, 1, 5, True)[0], Score)
    for name in ("objectnet", "objectnet-legacy"):
        with pytest.raises(ConfigError) as narrow:
            make_label_map(name, 10, 5, True)
        assert str(narrow.value) == (
            f"label map {name} needs a 1000-class ImageNet head, but the model outputs 10 classes: use --label-map "
            "none or a labels file"
        )
    with pytest.raises(ConfigError, match=r"^--topk 3 with the objectnet-legacy label map: "):
        make_label_map("objectnet-legacy", 1000, 3, True)
    legacy, summed = make_label_map("objectnet-legacy", 1000, 5, True)[0], make_label_map("auto", 1000, 5, False)[0]
    assert isinstance(legacy, ObjectNetLegacy) and (legacy.topk, legacy.softmax) == (5, True)
    assert isinstance(summed, ObjectNetSummed) and (summed.topk, summed.softmax) == (5, False)
    with pytest.raises(ConfigError) as names:
        make_label_map("imagenet-names", 10, 5, True)
    assert str(names.value) == (
        "label map imagenet-names names a 1000-class ImageNet head's classes, but the model outputs 10: use "
        "--label-map none or a labels file"
    )
    carried = ["cat", "dog", "cow"]
    assert make_label_map("auto", 3, 2, True, carried)[0].names == carried  # type: ignore[attr-defined]
    assert make_label_map("auto", 3, 2, True, carried[:2])[0].names is None  # type: ignore[attr-defined]
    assert make_label_map("none", 3, 2, True, carried)[0].names is None  # type: ignore[attr-defined]
    exact, said = make_label_map("none", 3, 3, False)
    assert isinstance(exact, TopK) and exact.topk == 3 and said == []
    wide, said = make_label_map("none", 3, 4, False)
    assert wide.topk == 3 and said == ["topk 4 is more than the model's 3 classes: writing 3"]


def test_a_head_without_names_writes_its_indices_and_keeps_its_softmax_setting() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    for softmax in (True, False):
        label_map = make_label_map("none", 3, 2, softmax)[0]
        assert label_map.softmax is softmax and TopK(2, softmax).softmax is softmax
        (prediction,) = label_map(logits)
        scores = logits.softmax(1)[0] if softmax else logits[0]
        assert prediction == Prediction(("1", "2"), (float(scores[1]), float(scores[2])))
