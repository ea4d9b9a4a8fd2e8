"""Every edit is a transaction: a failed or interrupted edit leaves the model as it was.

The fault-injection test is a matrix over the registry (like ``test_algorithm_matrix``): for every
registered algorithm it counts the hook points an edit passes (every forward pass of the model,
every copy into a weight anywhere in ``shift_edit`` (applying, restoring, an algorithm's temporary
writes and its ``finally`` that undoes them), and the seams between the steps:
weights applied, guard pass, memory, result), then raises ``KeyboardInterrupt`` and ``RuntimeError``
(the out-of-memory kind) at each one in turn, in ``se.edit``, ``apply_patch``, ``revert_patch`` and
``BaseEditor.edit``, and checks the weights bit for bit afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from _tiny import tiny_hparams, tiny_model, write_corpus

import shift_edit as se
import shift_edit.core.editing as editing
import shift_edit.core.result as result_mod
import shift_edit.files.patch as patch_mod
from shift_edit.compat.easyedit_editor import BaseEditor
from shift_edit.core.memory import EditMemory
from shift_edit.core.registry import algorithm_names, get_algorithm

REQ = {"prompt": "{} plays for", "subject": "Messi", "target_new": " Rome"}
REQ2 = {"prompt": "{} lives in", "subject": "Anna", "target_new": " Oslo"}
FAULTS = [KeyboardInterrupt, RuntimeError]


@pytest.fixture(scope="module")
def stats_corpus(tmp_path_factory) -> str:
    """One corpus and statistics cache for the module (covariances computed once per layer)."""
    folder = tmp_path_factory.mktemp("transactions")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHIFT_EDIT_CACHE", str(folder / "cache"))
        yield write_corpus(folder / "corpus.txt")


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_same(model: torch.nn.Module, want: dict[str, torch.Tensor], where: str) -> None:
    for n, p in model.state_dict().items():
        assert torch.equal(want[n], p), f"{where}: {n} changed"


class Injector:
    """Counts the hook points reached; raises ``fault`` at hook point number ``at`` (1-based)."""

    def __init__(self, fault: type[BaseException] | None = None, at: int = 0) -> None:
        self.fault, self.at, self.n, self.fired = fault, at, 0, False

    def __call__(self, *_args, **_kwargs) -> None:
        self.n += 1
        if self.n == self.at:
            self.fired = True
            raise self.fault("CUDA out of memory (injected)" if self.fault is RuntimeError else "injected")


def _wrap(fn, inj: Injector, *, before: bool = True, after: bool = True):
    def wrapped(*args, **kwargs):
        if before:
            inj()
        out = fn(*args, **kwargs)
        if after:
            inj()
        return out

    return wrapped


@contextlib.contextmanager
def hook_points(model: torch.nn.Module, inj: Injector):
    """Route every hook point of an edit through ``inj``."""
    handles = [model.register_forward_pre_hook(inj)]
    real_copy = torch.nn.Parameter.copy_

    def copy_(self, *args, **kwargs):  # a weight copy anywhere in shift_edit (apply, restore, temporary writes)
        if f"{os.sep}shift_edit{os.sep}" in sys._getframe(1).f_code.co_filename:
            inj()
        return real_copy(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Parameter, "copy_", copy_, raising=False)
        for mod in (editing, patch_mod):
            mp.setattr(mod, "apply_deltas", _wrap(mod.apply_deltas, inj, before=False))
            mp.setattr(mod, "check_outputs", _wrap(mod.check_outputs, inj))
        mp.setattr(EditMemory, "add", _wrap(EditMemory.add, inj))
        mp.setattr(result_mod.EditResult, "__post_init__", _wrap(result_mod.EditResult.__post_init__, inj, after=False))
        mp.setattr(result_mod, "restore_weights", _wrap(result_mod.restore_weights, inj))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def inject_everywhere(model, run, check, *, prepare=lambda: None, cleanup=lambda: None) -> int:
    """Run ``run()`` once clean to count its hook points, then once per (hook point, fault) with the
    fault raised there; ``check(fault, at)`` asserts the state afterwards. ``prepare`` and
    ``cleanup`` run outside the injection, before and after each run. Returns the count."""
    prepare()  # once without faults and uncounted: statistics computed and cached
    run()
    cleanup()
    inj = Injector()
    prepare()
    with hook_points(model, inj):
        run()
    cleanup()
    count = inj.n
    assert count > 0
    for at in range(1, count + 1):
        for fault in FAULTS:
            inj = Injector(fault, at)
            prepare()
            with hook_points(model, inj), pytest.raises(fault):
                run()
            assert inj.fired
            check(fault, at)
    return count


@pytest.mark.parametrize("alg", algorithm_names())
def test_interrupted_edit_leaves_the_model_unchanged(alg, byte_tok, stats_corpus):
    model = tiny_model("llama")
    hp = tiny_hparams(alg, stats_corpus)  # max_relative_norm None, force False: the guard pass runs
    base = state(model)
    memory = EditMemory() if get_algorithm(alg).uses_memory else None
    done = []

    def run():
        torch.manual_seed(0)
        done.append(se.edit(model, byte_tok, REQ, hp, memory=memory))

    def cleanup():
        done.pop().undo()
        if memory is not None:
            memory.restore({})

    def check(fault, at):
        assert_same(model, base, f"{fault.__name__} at hook point {at}")
        assert memory is None or len(memory) == 0, "a failed edit left keys in the memory"

    inject_everywhere(model, run, check, cleanup=cleanup)


@pytest.mark.parametrize("alg", algorithm_names())
def test_interrupted_apply_and_revert_patch(alg, byte_tok, stats_corpus, tmp_path):
    model = tiny_model("llama")
    hp = tiny_hparams(alg, stats_corpus)
    base = state(model)
    res = se.edit(model, byte_tok, REQ, hp, force=True)
    edited = state(model)
    path = res.save_patch(tmp_path / "p.safetensors")
    res.undo()

    inject_everywhere(model, lambda: se.apply_patch(model, path, tok=byte_tok),
                      lambda fault, at: assert_same(model, base, f"apply_patch, {fault.__name__} at {at}"),
                      cleanup=lambda: se.revert_patch(model, path))

    def check_revert(fault, at):  # all or nothing: still patched (and revertable again), or reverted
        if all(torch.equal(p, edited[n]) for n, p in model.state_dict().items()):
            se.revert_patch(model, path)
        assert_same(model, base, f"revert_patch, {fault.__name__} at {at}")

    inject_everywhere(model, lambda: se.revert_patch(model, path), check_revert,
                      prepare=lambda: se.apply_patch(model, path, tok=byte_tok))


@pytest.mark.parametrize("alg", algorithm_names())
def test_interrupted_easyedit_sequential_call(alg, byte_tok, stats_corpus):
    model = tiny_model("llama")
    hp = tiny_hparams(alg, stats_corpus)
    editor = BaseEditor(hp, model, byte_tok)
    base = state(model)

    def run():
        editor.edit(["Messi plays for", "Anna lives in"], [" Rome", " Oslo"], subject=["Messi", "Anna"],
                    sequential_edit=True, verbose=False)

    def check(fault, at):
        assert_same(model, base, f"{fault.__name__} at {at}")
        assert editor.history == [] and len(editor.memory) == 0

    inject_everywhere(model, run, check, cleanup=editor.undo_all)


@pytest.mark.parametrize("alg", ["SHIFT", "SHIFT_NEURON"])
def test_out_of_order_undo_refuses_and_names_the_edit(alg, byte_tok, stats_corpus):
    """Two edits of the same matrix: undoing the older first would drop the newer silently and
    leave the model changed after both undos; it is refused with one line naming the newer edit."""
    model = tiny_model("llama")
    hp = tiny_hparams(alg, stats_corpus)
    base = state(model)
    first = se.edit(model, byte_tok, REQ, hp, force=True)
    second = se.edit(model, byte_tok, REQ2, hp, force=True)
    assert set(first.orig_weights) & set(second.orig_weights)
    both = state(model)
    with pytest.raises(se.ShiftEditError, match=r"undo that one first") as info:
        first.undo()
    assert "'Anna lives in' -> ' Oslo'" in str(info.value) and "\n" not in str(info.value)
    assert_same(model, both, "a refused undo")
    assert not first.undone
    second.undo()
    first.undo()
    assert_same(model, base, "undo newest first")


def test_out_of_order_undo_of_other_matrices_is_allowed(byte_tok, stats_corpus):
    model = tiny_model("llama")
    base = state(model)
    first = se.edit(model, byte_tok, REQ, tiny_hparams("SHIFT", stats_corpus, layers=[0]), force=True)
    second = se.edit(model, byte_tok, REQ2, tiny_hparams("SHIFT", stats_corpus, layers=[2]), force=True)
    assert not set(first.orig_weights) & set(second.orig_weights)
    first.undo()
    second.undo()
    assert_same(model, base, "independent undos")


def test_easyedit_sequential_call_validates_every_request_first(byte_tok, stats_corpus):
    model = tiny_model("llama")
    editor = BaseEditor(tiny_hparams("SHIFT", stats_corpus), model, byte_tok)
    base = state(model)
    prompts = ["Messi plays for", "Anna lives in", "Bob works at"]
    for bad in ([" Rome", " Oslo", " "], [" Rome", " Oslo", None]):
        with pytest.raises(se.ShiftEditError, match=r"Bob works at|target_new\[2\]"):
            editor.edit(prompts, bad, sequential_edit=True, verbose=False)
        assert_same(model, base, f"target_new {bad}")
        assert editor.history == []


def test_easyedit_sequential_call_restores_when_an_edit_fails_midway(byte_tok, stats_corpus, monkeypatch):
    import shift_edit.compat.easyedit_editor as editor_mod

    model = tiny_model("llama")
    editor = BaseEditor(tiny_hparams("SHIFT", stats_corpus), model, byte_tok)
    base = state(model)
    real, calls = editor_mod.edit, []

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise se.ShiftEditError("the third edit failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(editor_mod, "edit", third_fails)
    with pytest.raises(se.ShiftEditError, match=r"the third edit failed \(the 2 earlier edit\(s\) .* were undone"):
        editor.edit(["Messi plays for", "Anna lives in", "Bob works at"], [" Rome", " Oslo", " Kyiv"],
                    sequential_edit=True, verbose=False)
    assert_same(model, base, "a failed sequential call")
    assert editor.history == [] and len(editor.memory) == 0
