"""Hparams: typed, validated on construction, YAML round-trip, clear errors."""

from pathlib import Path

import pytest
import yaml

import shift_edit as se

REPO = Path(__file__).resolve().parents[1]


def test_yaml_round_trip(tmp_path):
    hp = se.ShiftHyperParams(layers=[3, 5], eta=0.24, eta_scaling="normalized", model_name="gpt2-xl")
    path = tmp_path / "hp.yaml"
    text = hp.to_yaml(path)
    data = yaml.safe_load(text)
    assert list(data) == sorted(data), "keys are sorted"
    assert data["alg_name"] == "SHIFT" and data["shift_edit_version"] == se.__version__
    assert se.ShiftHyperParams.from_hparams(path) == hp
    assert se.ShiftHyperParams.from_hparams(tmp_path / "hp") == hp, "the .yaml suffix may be left off"
    assert se.load_hparams(path) == hp


@pytest.mark.parametrize(
    "data, match",
    [
        ({"layers": [1], "eta": 0.1, "etta": 2}, r"unknown hparams \['etta'\]"),
        ({"layers": [1]}, r"missing required hparams \['eta'\]"),
        ({"layers": [1], "eta": "big"}, r"ShiftHyperParams.eta: got 'big' \(str\); expected float"),
        ({"layers": 1, "eta": 0.1}, r"layers: got 1 .*expected list of int"),
        ({"layers": [1], "eta": 0.1, "d_source": "wte"},
         r"d_source: got 'wte'.*'decoding' \| 'input_embedding' \| 'centered'"),
        ({"layers": [1], "eta": -1.0}, r"eta: got -1.0; it must be a finite number > 0"),
        ({"layers": [], "eta": 1.0}, r"layers: got \[\]; give at least one layer"),
        ({"layers": [1], "eta": 1.0, "skip_if_predicted": "yes"}, r"skip_if_predicted: got 'yes'"),
        ({"alg_name": "ROME", "layers": [1], "eta": 1.0}, r"alg_name is 'ROME' but these hparams are for 'SHIFT'"),
    ],
)
def test_bad_hparams_are_clear_errors(data, match):
    with pytest.raises(se.ShiftEditError, match=match):
        se.ShiftHyperParams.from_dict(data)


def test_int_is_accepted_for_float_and_bool_is_not_int():
    assert se.ShiftHyperParams(layers=[1], eta=2).eta == 2.0
    with pytest.raises(se.ShiftEditError):
        se.ShiftHyperParams(layers=[True], eta=1.0)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(se.ShiftEditError, match="hparams file not found"):
        se.ShiftHyperParams.from_hparams(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [1\n")
    with pytest.raises(se.ShiftEditError, match="not valid YAML"):
        se.ShiftHyperParams.from_hparams(bad)


@pytest.mark.parametrize("path", sorted((REPO / "hparams").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_hparams_load(path):
    hp = se.load_hparams(path)
    assert type(hp).ALG_NAME == path.parent.name


def test_paper_hparams_for_gpt2_xl():
    hp = se.ShiftHyperParams.from_hparams(REPO / "hparams/SHIFT/gpt2-xl.yaml")
    assert hp.layers == [35] and hp.eta == 0.24 and hp.eta_scaling == "raw" and hp.target_tokens == "first"
