"""runtime.contract: the label set and preprocessing spec that travel with every artifact."""

import json

import pytest

from runtime.contract import ContractError, LabelSet, ModelContract, PreprocessSpec


def test_coco_label_set_has_80_non_contiguous_ids_in_ascending_order():
    labels = LabelSet.coco()
    assert labels.num_classes == 80
    assert labels.category_ids[0] == 1 and labels.category_ids[-1] == 90
    missing = sorted(set(range(1, 91)) - set(labels.category_ids))
    assert missing == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert labels.names[labels.index_of()[18]] == "dog"


def test_json_round_trip_keeps_labels_and_spec():
    c = ModelContract(LabelSet.from_categories([{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]),
                      PreprocessSpec(size=224, interpolation="linear"))
    assert c.labels.category_ids == (3, 18)                  # sorted by id: index order
    back = ModelContract.from_json(c.to_json())
    assert back == c
    d = json.loads(c.to_json())
    assert d["preprocess"]["size"] == 224 and d["labels"][1] == {"id": 18, "name": "dog"}


@pytest.mark.parametrize("text", ["not json", json.dumps({"format": "other"}),
                                  json.dumps({"format": "probres-contract/1", "labels": []})])
def test_malformed_contract_is_a_contract_error(text):
    with pytest.raises(ContractError):
        ModelContract.from_json(text)


def test_spec_validation():
    with pytest.raises(ContractError, match="size"):
        PreprocessSpec(size=3)
    with pytest.raises(ContractError, match="interpolation"):
        PreprocessSpec(interpolation="cubic")
