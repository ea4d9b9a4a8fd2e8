"""EasyEdit's facade: ``BaseEditor.from_hparams(hparams).edit(prompts, target_new, ...)``.

Follows zjunlp/EasyEdit at commit ``14cea8245f06715684592ab55184939b99d70784`` (July 2026),
``easyeditor/editors/editor.py``: the same signatures, request dicts, modes and ``metrics``
keys, for every algorithm in the registry.

- ``sequential_edit=False`` (default): each request is edited alone, measured, and the weights
  are restored (bit-exactly) before the next; the returned model is the restored one (it is
  the editor's model, as in EasyEdit).
- ``sequential_edit=True``: each request is edited on top of the earlier ones and measured
  right after its own edit; the model stays edited (``undo_all()`` reverts).
- One choice differs: ``weights_copy`` holds the original (pre-call) value of every parameter
  any request of the call changed, so ``restore_weights(model, weights_copy)`` always gives the
  unedited model back (EasyEdit returns the last request's copy only, which after several
  sequential edits restores just part of them).

Metrics are EasyEdit's family (token accuracy, locality as argmax agreement; see
:mod:`shift_edit.compat.easyedit_metrics`), labelled in ``metric_meta`` as EasyEdit labels them; our own
families (strict top-1, ROME's comparison) sit beside them under ``shift_edit``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ..core.editing import edit
from ..core.errors import ShiftEditError
from ..core.guard import check_context
from ..core.hparams import HyperParams
from ..core.memory import EditMemory
from ..core.registry import algorithm_for_hparams, load_hparams  # noqa: F401 - load_hparams re-exported
from ..core.requests import make_request
from ..core.result import EditResult
from ..files.io import atomic_write_text
from ..model import loading
from . import easyedit_metrics as ee

log = logging.getLogger(__name__)

METRIC_FAMILY = "easyedit_token_accuracy"

#: keyword arguments EasyEdit's ``edit``/``edit_requests`` take; with no effect here: ``train_ds``
#: (IKE's), ``keep_original_weight`` (EasyEdit ignores it too since 2025), ``requests`` is used.
KNOWN_KWARGS = frozenset({"subject", "test_generation", "keep_original_weight", "eval_metric", "requests",
                          "pre_edit", "pre_file", "train_ds", "loc_prompts"})
_EXACT_MATCH = (None, "exact match", "token_em")
_PASSED_ON = frozenset({"eval_metric", "pre_edit", "pre_file", "train_ds", "keep_original_weight"})


def _warn_unknown(kwargs: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(kwargs) - KNOWN_KWARGS)
    if unknown:
        log.warning("BaseEditor.%s: ignored keyword arguments %s (not used here)", where, ", ".join(unknown))


class BaseEditor:
    """Edit a model with any registered algorithm, EasyEdit style.

    Args:
        hparams: the algorithm's hparams (ours, or read from EasyEdit/ROME files).
        model / tok: an already loaded model and tokenizer; if omitted, ``hparams.model_name``
            is loaded with :func:`shift_edit.load_model`.
    """

    def __init__(self, hparams: HyperParams, model: nn.Module | None = None, tok=None) -> None:
        if hparams is None:
            raise ShiftEditError("hparams is None")
        if model is None:
            name = getattr(hparams, "model_name", "")
            if not name:
                raise ShiftEditError("hparams.model_name is empty: pass model= and tok= or set model_name")
            model, tok = loading.load_model(name)  # looked up at call time: tests substitute it
        if tok is None:
            raise ShiftEditError("a model was given without its tokenizer (tok=)")
        self.hparams = hparams
        self.alg_name = algorithm_for_hparams(hparams).name
        self.model_name = getattr(hparams, "model_name", "")
        self.model = model
        self.tok = tok
        self.history: list[EditResult] = []
        self.memory = EditMemory()

    @classmethod
    def from_hparams(cls, hparams: HyperParams | str | Path, model: nn.Module | None = None, tok=None) -> BaseEditor:
        """Build from hparams or an hparams file path (YAML, ours or EasyEdit's; ROME's JSON)."""
        if not isinstance(hparams, HyperParams):
            hparams = load_hparams(hparams)
        return cls(hparams, model, tok)

    # ------------------------------------------------------------------ EasyEdit's entry points
    def edit(
        self,
        prompts: str | list[str],
        target_new: str | list[str],
        ground_truth: str | list[str] | None = None,
        target_neg: str | list[str] | None = None,
        rephrase_prompts: str | list[str] | None = None,
        locality_inputs: dict | None = None,
        portability_inputs: dict | None = None,
        sequential_edit: bool = False,
        verbose: bool = True,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], nn.Module, dict[str, torch.Tensor]]:
        """Edit each fact and measure it before and after (EasyEdit token accuracy family).

        Args:
            prompts / target_new / ground_truth / target_neg / rephrase_prompts: one value or one
                per edit (as EasyEdit).
            locality_inputs / portability_inputs: ``{name: {"prompt": [...], "ground_truth": [...]}}``,
                one entry per edit (an entry may itself be a list of prompts; ``None`` skips it).
            sequential_edit: keep each edit and make the next on top of it (see the module doc).
            verbose: log each edit's metrics.
            **kwargs: ``subject``, ``test_generation``, ``eval_metric``, ``requests``, ``pre_edit``,
                ``pre_file``, ``loc_prompts``, ``keep_original_weight``/``train_ds`` (no effect);
                any other name is a warning.

        Returns:
            ``(metrics, edited_model, weights_copy)`` as EasyEdit returns them.
        """
        _warn_unknown(kwargs, "edit")
        test_generation = kwargs.pop("test_generation", False)
        prompts, target_new = self._normalise(prompts, target_new)
        truths = self._ground_truths(ground_truth, prompts)
        if kwargs.get("requests") is not None:
            requests = kwargs.pop("requests")
        else:
            requests = ee.prepare_requests(prompts, target_new, truths, target_neg, rephrase_prompts,
                                           locality_inputs, portability_inputs, **kwargs)
        passed = {k: v for k, v in kwargs.items() if k in _PASSED_ON}
        return self.edit_requests(requests, sequential_edit, verbose, test_generation=test_generation, **passed)

    def batch_edit(
        self,
        prompts: list[str],
        target_new: list[str],
        ground_truth: list[str] | None = None,
        target_neg: list[str] | None = None,
        rephrase_prompts: list[str] | None = None,
        locality_inputs: dict | None = None,
        portability_inputs: dict | None = None,
        sequential_edit: bool = False,
        verbose: bool = True,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], nn.Module, dict[str, torch.Tensor]]:
        """EasyEdit's ``batch_edit``: requests in chunks of ``hparams.batch_size`` (all at once for
        hparams without one), each chunk applied as one batch, every request measured before and
        after; the chunk is undone unless ``sequential_edit``. ``case_id`` counts within a chunk
        and ``time`` is the chunk's edit time, as in EasyEdit."""
        _warn_unknown(kwargs, "batch_edit")
        test_generation = kwargs.pop("test_generation", False)
        if isinstance(prompts, str) or len(prompts) != len(target_new):
            raise ShiftEditError("batch_edit takes lists of prompts and target_new of the same length")
        truths = self._ground_truths(ground_truth, prompts)
        requests = ee.prepare_requests(prompts, target_new, truths, target_neg, rephrase_prompts,
                                       locality_inputs, portability_inputs, **kwargs)
        self._validate(requests)
        size = getattr(self.hparams, "batch_size", None) or len(requests)
        all_metrics: list[dict[str, Any]] = []
        weights: dict[str, torch.Tensor] = {}
        with self._all_or_none(sequential_edit):
            self._batches(requests, size, sequential_edit, verbose, test_generation, all_metrics, weights)
        return all_metrics, self.model, weights

    def _batches(self, requests: list[dict[str, Any]], size: int, sequential_edit: bool, verbose: bool,
                 test_generation: bool, all_metrics: list[dict[str, Any]], weights: dict[str, torch.Tensor]) -> None:
        """:meth:`batch_edit`'s loop over chunks; fills ``all_metrics`` and ``weights``."""
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            metrics = [{"case_id": i, "requested_rewrite": r, "pre": self._quality(r, test_generation)}
                       for i, r in enumerate(chunk)]
            ours_pre = [ee.our_families(self.model, self.tok, r) for r in chunk]
            t0 = time.perf_counter()
            result = edit(self.model, self.tok, [self._request(r, start + i) for i, r in enumerate(chunk)],
                          self.hparams, memory=self.memory if sequential_edit else None)
            exec_time = time.perf_counter() - t0
            for name, orig in result.orig_weights.items():
                weights.setdefault(name, orig)
            try:
                for i, (m, r) in enumerate(zip(metrics, chunk)):
                    m["time"] = exec_time
                    m["post"] = self._quality(r, test_generation)
                    m["shift_edit"] = self._ours(ours_pre[i], r, result, i)
            finally:  # a failed measurement never leaves a non-sequential edit applied
                self._keep_or_undo(result, sequential_edit)
            for m, r in zip(metrics, chunk):
                ee.finalize_locality(m, r)
                if verbose:
                    log.info("%s editing: %s -> %s\n%s", m["case_id"], r["prompt"], r["target_new"], m)
            all_metrics.extend(metrics)

    def edit_requests(
        self,
        requests: Sequence[Mapping[str, Any]],
        sequential_edit: bool = False,
        verbose: bool = True,
        test_generation: bool = False,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], nn.Module, dict[str, torch.Tensor]]:
        """EasyEdit's ``edit_requests``: EasyEdit request dicts (``prompt``, ``target_new``,
        ``ground_truth``, ``subject``, ``rephrase_prompt``, ``locality``, ``portability``) edited
        one at a time (see :meth:`edit`)."""
        _warn_unknown(kwargs, "edit_requests")
        if kwargs.get("eval_metric") not in _EXACT_MATCH:
            raise ShiftEditError(f"eval_metric={kwargs['eval_metric']!r} is not computed here; "
                                 "only EasyEdit's token accuracy ('exact match' / 'token_em')")
        requests = [dict(r) if isinstance(r, Mapping) else _not_a_request(r, i) for i, r in enumerate(requests)]
        for r in requests:
            r.setdefault("locality", {})
            r.setdefault("portability", {})
        if not requests:
            raise ShiftEditError("no requests given")
        self._validate(requests)
        if kwargs.get("pre_edit") is not None:
            all_metrics = [dict(m) for m in kwargs["pre_edit"]]
            if len(all_metrics) != len(requests):
                raise ShiftEditError(f"pre_edit has {len(all_metrics)} entries for {len(requests)} requests")
        else:
            all_metrics = [{"pre": self._quality(r, test_generation)} for r in requests]
            if kwargs.get("pre_file") is not None:
                atomic_write_text(Path(kwargs["pre_file"]), json.dumps(all_metrics, indent=4))
        weights: dict[str, torch.Tensor] = {}
        with self._all_or_none(sequential_edit):
            for i, r in enumerate(requests):
                ours_pre = ee.our_families(self.model, self.tok, r)
                t0 = time.perf_counter()
                result = edit(self.model, self.tok, [self._request(r, i)], self.hparams,
                              memory=self.memory if sequential_edit else None)
                exec_time = time.perf_counter() - t0
                for name, orig in result.orig_weights.items():
                    weights.setdefault(name, orig)
                try:
                    all_metrics[i].update({"case_id": i, "requested_rewrite": r, "time": exec_time,
                                           "post": self._quality(r, test_generation)})
                    all_metrics[i]["shift_edit"] = self._ours(ours_pre, r, result, 0)
                finally:  # a failed measurement never leaves a non-sequential edit applied
                    self._keep_or_undo(result, sequential_edit)
                ee.finalize_locality(all_metrics[i], r)
                if verbose:
                    log.info("%d editing: %s -> %s\n%s", i, r["prompt"], r["target_new"], all_metrics[i])
        log.info("Metrics Summary (EasyEdit token accuracy): %s", ee.summary_metrics(all_metrics))
        return all_metrics, self.model, weights

    def undo_all(self) -> None:
        """Undo every edit kept by sequential editing through this editor, newest first."""
        while self.history:
            self.history.pop().undo()
        self.memory = EditMemory()

    # ------------------------------------------------------------------ helpers
    def _validate(self, requests: Sequence[Mapping[str, Any]]) -> None:
        """Every request checked (fields, template, context length) before the first edit."""
        check_context(self.model, self.tok, [self._request(r, i) for i, r in enumerate(requests)])

    @contextlib.contextmanager
    def _all_or_none(self, sequential_edit: bool) -> Iterator[None]:
        """A call's sequential edits are kept whole or not at all: if an edit or a measurement
        fails (or is interrupted), the edits this call made are undone, newest first, the memory
        is put back, and the error says so."""
        kept, memory = len(self.history), self.memory.snapshot()
        try:
            yield
        except BaseException as exc:
            made = self.history[kept:]
            while len(self.history) > kept:
                self.history.pop().undo()
            self.memory.restore(memory)
            if made and isinstance(exc, ShiftEditError) and exc.args:
                exc.args = (f"{exc.args[0]} (the {len(made)} earlier edit(s) of this sequential_edit call were "
                            "undone: the model is as it was before the call)", *exc.args[1:])
            raise

    @staticmethod
    def _normalise(prompts: Any, target_new: Any) -> tuple[list[str], list[str]]:
        if isinstance(prompts, str):
            prompts, target_new = [prompts], [target_new]
        if isinstance(target_new, str):
            target_new = [target_new]
        prompts, target_new = _strings(prompts, "prompts"), _strings(target_new, "target_new")
        if len(prompts) != len(target_new):
            raise ShiftEditError(f"{len(prompts)} prompts but {len(target_new)} target_new")
        return prompts, target_new

    @staticmethod
    def _ground_truths(ground_truth: Any, prompts: Sequence[str]) -> list[Any]:
        if ground_truth is None:
            return [None] * len(prompts)
        if not isinstance(ground_truth, (str, list, tuple)):
            raise ShiftEditError(f"ground_truth must be a string or a list, got {type(ground_truth).__name__}")
        truths = [ground_truth] if isinstance(ground_truth, str) else list(ground_truth)
        if len(truths) != len(prompts):
            raise ShiftEditError(f"ground_truth has {len(truths)} entries for {len(prompts)} prompts")
        return truths

    def _quality(self, request: Mapping[str, Any], test_generation: bool) -> dict[str, Any]:
        return ee.compute_edit_quality(self.model, self.tok, request, test_generation=test_generation)

    @staticmethod
    def _request(r: Mapping[str, Any], case_id: int):
        truth = r.get("ground_truth")
        if isinstance(truth, list):
            truth = truth[0] if truth else None
        return make_request({"prompt": r.get("prompt"), "target_new": r.get("target_new"), "subject": r.get("subject"),
                             "ground_truth": truth, "case_id": case_id})

    def _ours(self, pre: dict[str, Any], request: Mapping[str, Any], result: EditResult, i: int) -> dict[str, Any]:
        return {"families": ee.OUR_FAMILIES, "algorithm": self.alg_name,
                "skipped": bool(result.skipped[i]) if i < len(result.skipped) else False,
                "pre": pre, "post": ee.our_families(self.model, self.tok, request)}

    def _keep_or_undo(self, result: EditResult, sequential_edit: bool) -> None:
        if sequential_edit:
            self.history.append(result)
        else:
            result.undo()


def _not_a_request(value: Any, i: int) -> NoReturn:
    """The error for a request that is not a dict (used inside a comprehension)."""
    raise ShiftEditError(f"requests[{i}] must be a dict (EasyEdit request), got {type(value).__name__}")


def _strings(value: Any, name: str) -> list[str]:
    """``value`` as a list of strings, or a ShiftEditError naming the argument."""
    if not isinstance(value, (list, tuple)):
        raise ShiftEditError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    bad = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
    if bad is not None:
        raise ShiftEditError(f"{name}[{bad}] must be a string, got {value[bad]!r}")
    return list(value)
