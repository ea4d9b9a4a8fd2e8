"""docs/ARCHITECTURE.md's "Add an algorithm" recipe, followed: its code block registers a toy algorithm, which then
edits, undoes, saves a patch and applies it on a tiny model like any shipped algorithm."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _tiny import tiny_model

import shift_edit as se
from shift_edit.core import registry
from shift_edit.model.hooks import forward_capture

DOC = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md"
REQ = {"prompt": "{} plays for", "subject": "Messi", "target_new": {"str": "Rome"}}


def recipe_code() -> str:
    """The ```python block of the "Add an algorithm" section."""
    section = DOC.read_text(encoding="utf-8").split("## Add an algorithm", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the recipe has one code block"
    return blocks[0]


@pytest.fixture
def toy():
    """The recipe's namespace, with TOY registered for the test only."""
    namespace: dict = {}
    exec(compile(recipe_code(), str(DOC), "exec"), namespace)  # noqa: S102 - the documented recipe, run as written
    try:
        yield namespace
    finally:
        registry._REGISTRY.pop("TOY", None)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_recipe_registers_an_algorithm_the_whole_toolkit_uses(toy, byte_tok, tmp_path):
    hp = toy["ToyHyperParams"](layers=[1], scale=0.25, skip_if_predicted=False)
    alg = se.get_algorithm("TOY")
    assert "TOY" in se.algorithm_names() and alg.step_field == "scale" and alg.linear_step
    assert registry.run_tag("TOY", hp.to_dict()) == " L1 scale 0.25"

    model = tiny_model("llama")
    base = _state(model)
    result = se.edit(model, byte_tok, REQ, hp)
    edited = _state(model)
    changed = [n for n in base if not torch.equal(base[n], edited[n])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    assert result.deltas[0].rank == 1
    # the toy's promise: at FF2's input of the last prompt token, the edited FF2 writes `scale` more of the
    # target's decoding row (Llama's FF2 is an nn.Linear: the weight is [out, in])
    adapter = se.ModelAdapter(model)
    name = adapter.ff2_name(1)
    prompt = byte_tok("Messi plays for").input_ids
    result.undo()
    captured, _ = forward_capture(model, torch.tensor([prompt]), None, [name])
    key = captured.inputs[name][0, -1].double()
    target_row = adapter.decoding_matrix()[byte_tok(" Rome").input_ids[0]].double()
    moved = (edited[changed[0]].double() - base[changed[0]].double()) @ key
    assert torch.allclose(moved, 0.25 * target_row, atol=1e-4)
    result = se.edit(model, byte_tok, REQ, hp)

    patch = result.save_patch(tmp_path / "toy.safetensors")
    result.undo()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())  # undo is bit-exact

    applied = se.apply_patch(model, patch, tok=byte_tok)
    assert applied.algorithm == "TOY"
    assert all(torch.equal(p, edited[n]) for n, p in model.named_parameters())  # the patch is the edit
    se.revert_patch(model, applied)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())

    # ROME's contract and the EasyEdit facade come with the registration
    model2, orig = se.apply_toy_to_model(model, byte_tok, [REQ], hp, return_orig_weights=True)
    assert model2 is model and set(orig) == set(changed)
    se.restore_weights(model, orig)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


def test_the_recipe_hparams_refuse_a_bad_step(toy):
    with pytest.raises(se.ShiftEditError, match="scale"):
        toy["ToyHyperParams"](layers=[1], scale=0.0)
