"""Integration on the embedded SmolLM2-135M with the shipped hparams."""

import torch

import shift_edit as se
from shift_edit.model.scoring import score_continuations

# Facts written for these tests (not from CounterFact): prompt, subject, new object.
FACTS = [
    ("The Eiffel Tower is located in the city of", None, " Rome"),
    ("{} is the capital of", "Paris", " Germany"),
    ("The native language of {} is", "Angela Merkel", " Japanese"),
    ("{} was written by", "Hamlet", " Goethe"),
    ("The largest planet of the solar system is", None, " Mars"),
    ("{} plays the", "Yo-Yo Ma", " trumpet"),
]


def _req(prompt, subject, target):
    return {"prompt": prompt, "subject": subject, "target_new": target}


def test_shipped_hparams_make_written_facts_top1(smollm2):
    model, tok = smollm2
    hp = se.ShiftHyperParams.from_hparams("hparams/SHIFT/smollm2-135m")
    made = 0
    for fact in FACTS:
        req = se.make_request(_req(*fact))
        before = score_continuations(model, tok, [req.text], [req.target_new])[0]
        assert not before.all_correct, f"{req.text!r} -> {req.target_new!r} is not new"
        result = se.edit(model, tok, req, hp)
        after = score_continuations(model, tok, [req.text], [req.target_new])[0]
        made += after.all_correct
        result.undo()
    assert made >= 5, f"only {made} of {len(FACTS)} facts became top-1"


def test_undo_is_bit_exact_over_many_edits(smollm2):
    model, tok = smollm2
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = se.ShiftHyperParams.from_hparams("hparams/SHIFT/smollm2-135m")
    results = [se.edit(model, tok, _req(*f), hp.replace(layers=[20 + i % 6])) for i, f in enumerate(FACTS * 2)]
    results.append(se.edit(model, tok, [_req(*f) for f in FACTS], hp))  # one batch too
    for r in reversed(results):
        r.undo()
    for n, p in model.named_parameters():
        assert torch.equal(state[n], p), n


def test_patch_is_small_and_full_save_reloads_identically(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    hp = se.ShiftHyperParams.from_hparams("hparams/SHIFT/smollm2-135m")
    result = se.edit(model, tok, _req(*FACTS[0]), hp)
    try:
        patch = result.save_patch(tmp_path / "rome.safetensors")
        assert patch.stat().st_size < 100_000
        ids = torch.tensor([tok("The Eiffel Tower is located in the city of").input_ids])
        with torch.no_grad():
            edited_logits = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / "full")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, edited_logits)
    finally:
        result.undo()
    fresh, _ = se.load_model("smollm2-135m")
    applied = se.apply_patch(fresh, patch)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, edited_logits)
    se.revert_patch(fresh, applied)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_api_guide_python_example_runs_as_written(smollm2, tmp_path, monkeypatch):
    """The Python API block of docs/api.md, executed verbatim (patch file in a temp folder): every
    step works and the model ends bit-exactly unedited."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    page = (repo / "docs" / "api.md").read_text()
    block = re.search(r"```python\n(import shift_edit as se\n.*?)```", page, re.S).group(1)
    model, tok = smollm2
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(se, "load_model", lambda name, **kw: (model, tok))  # the session's copy
    monkeypatch.chdir(repo)
    block = block.replace('"messi.safetensors"', repr(str(tmp_path / "messi.safetensors")))
    scope: dict = {}
    exec(compile(block, "docs/api.md", "exec"), scope)
    assert scope["applied"].deltas and scope["metrics"][0]["post"]["rewrite_acc"] is not None
    assert scope["edited_model"] is model
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), n


def test_readme_python_example_runs_as_written(smollm2, tmp_path, monkeypatch):
    """The README's Python block, executed verbatim from an empty folder (the shipped hparams are found from
    anywhere): the edit is made, saved as weights (save_pretrained, intercepted: 0.5 GB) and as a patch, then
    undone bit-exactly."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    block = re.search(r"```python\n(import shift_edit as se\n.*?)```", (repo / "README.md").read_text(), re.S).group(1)
    model, tok = smollm2
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(se, "load_model", lambda name, **kw: (model, tok))  # the session's copy
    saved = {}

    def save_pretrained(folder, **kw):  # what the block saves must be the edited weights
        saved[folder] = any(not torch.equal(p, state[n]) for n, p in model.named_parameters())

    monkeypatch.setattr(model, "save_pretrained", save_pretrained)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert list(saved.values()) == [True]
    assert (tmp_path / "messi.safetensors").stat().st_size < 100_000
    assert scope["result"].undone
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), n
