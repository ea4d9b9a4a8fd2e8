"""Request formats, leading spaces and the errors for bad requests."""

import pytest

import shift_edit as se
from shift_edit.core.requests import encode_target


def test_rome_counterfact_and_easyedit_formats_agree():
    rome = {"prompt": "{} plays for", "subject": "Lionel Messi", "target_new": {"str": "Paris"},
            "target_true": {"str": "Barcelona"}}
    cf = {"case_id": 7, "requested_rewrite": rome}
    flat = {"prompt": "Lionel Messi plays for", "subject": "Lionel Messi", "target_new": "Paris",
            "ground_truth": "Barcelona"}
    a, b, c = se.make_request(rome), se.make_request(cf), se.make_request(flat)
    assert a.text == b.text == c.text == "Lionel Messi plays for"
    assert a.target_new == b.target_new == c.target_new == " Paris"
    assert a.target_true == c.target_true == " Barcelona"
    assert b.case_id == 7


def test_leading_space_not_doubled():
    assert se.make_request({"prompt": "x is", "target_new": " y"}).target_new == " y"
    assert se.make_request({"prompt": "x is ", "target_new": "y"}).target_new == "y"


@pytest.mark.parametrize(
    "req, match",
    [
        ({"prompt": "{} plays for", "target_new": "Paris"}, "has '{}' but no subject"),
        ({"prompt": "x plays for", "target_new": "  "}, "target_new for prompt 'x plays for' is empty"),
        ({"prompt": "", "target_new": "Paris"}, "request has no prompt"),
        ({"prompt": "x plays for"}, "has no target_new"),
        ({"prompt": "x plays for", "subject": "Messi", "target_new": "P"}, "subject 'Messi' does not occur"),
        ({"prompt": "x", "target_new": {"id": 3}}, "mapping without 'str'"),
        ("just a string", "must be a mapping"),
    ],
)
def test_bad_requests(req, match):
    with pytest.raises(se.ShiftEditError, match=match):
        se.make_request(req)


def test_no_requests():
    with pytest.raises(se.ShiftEditError, match="no requests"):
        se.make_requests([])


def test_target_tokenisation_follows_the_prompt(byte_tok):
    assert encode_target(byte_tok, "Messi plays for", " Paris") == byte_tok(" Paris").input_ids


def test_smollm2_leading_space(smollm2):
    _, tok = smollm2
    req = se.make_request({"prompt": "The Eiffel Tower is located in the city of", "target_new": "Paris"})
    assert encode_target(tok, req.text, req.target_new) == tok(" Paris").input_ids == [7042]
