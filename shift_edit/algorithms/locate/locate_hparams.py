"""The hparams ROME, MEMIT and AlphaEdit share: :class:`LocateEditHyperParams` (the fact token, v*'s optimisation,
the contexts, the statistics), :class:`ReferenceLocateEditHyperParams` (the reference code's semantics or this
toolkit's earlier variants) and :class:`ZStarHyperParams` (MEMIT's and AlphaEdit's z* and key settings), with the
run tags of the earlier variants (:func:`reference_tags`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from ..common import EditHyperParams


@dataclasses.dataclass(kw_only=True)
class LocateEditHyperParams(EditHyperParams):
    """Fields ROME and MEMIT share.

    Attributes:
        fact_token: where the key is read: ``subject_last`` (paper), ``subject_first`` or
            ``last`` (the prompt's last token).
        v_num_grad_steps / v_lr: Adam steps and learning rate for δ.
        v_weight_decay: weight of ``||δ|| / ||ref||²`` in the loss.
        clamp_norm_factor: ``||δ|| <= clamp_norm_factor * ||ref||``.
        kl_factor: weight of the KL term on ``"{subject} is a"``.
        loss_stop: stop early when the total loss falls below this.
        context_template_length_params: ``[[length, count], ...]`` of generated contexts: ``count`` texts of
            ``length`` tokens (new tokens here; ROME/MEMIT/AlphaEdit count the prefix too by default, see
            :class:`ReferenceLocateEditHyperParams`).
        context_seed: seed of the context generation.
        mom2_corpus: text file or ``hf:<dataset>/<config>/<split>``; ``null`` = the default
            (local WikiText-2 test split when found, else WikiText-103 via ``datasets``).
        mom2_n_tokens: number of token vectors (non-padding tokens) in ``C``.
        mom2_max_length: truncation length of each corpus text.
        mom2_dtype: ``float32`` or ``float64`` accumulation.
    """

    fact_token: Literal["subject_last", "subject_first", "last"] = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    loss_stop: float = 5e-2
    context_template_length_params: list[list[int]] = dataclasses.field(
        default_factory=lambda: [[5, 10], [10, 10]]
    )
    context_seed: int = 0
    mom2_corpus: str | None = None
    mom2_n_tokens: int = 100_000
    mom2_max_length: int = 256
    mom2_dtype: Literal["float32", "float64"] = "float32"

    def validate(self) -> None:
        super().validate()
        if self.v_num_grad_steps < 1:
            self._fail("v_num_grad_steps", self.v_num_grad_steps, "it must be >= 1")
        for name in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                self._fail(name, getattr(self, name), "it must be > 0")
        for name in ("v_weight_decay", "kl_factor", "loss_stop"):
            if getattr(self, name) < 0:
                self._fail(name, getattr(self, name), "it must be >= 0")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or pair[0] < 1 or pair[1] < 0:
                self._fail("context_template_length_params", self.context_template_length_params,
                           "use [[length >= 1, count >= 0], ...]")
        if self.mom2_n_tokens < 1 or self.mom2_max_length < 1:
            self._fail("mom2_n_tokens", self.mom2_n_tokens, "mom2_n_tokens and mom2_max_length must be >= 1")


@dataclasses.dataclass(kw_only=True)
class ReferenceLocateEditHyperParams(LocateEditHyperParams):
    """The fields of ROME, MEMIT and AlphaEdit: :class:`LocateEditHyperParams` plus the choice between the
    reference code's semantics (the defaults: kmeng01/rome, kmeng01/memit, zjunlp/EasyEdit, AlphaEdit's code) and
    this toolkit's earlier variants, kept as options. With the defaults and the same templates and statistics, ROME's
    and MEMIT's ΔW equal a re-derivation of the reference equations (``tests/test_reference_semantics.py``).

    Attributes:
        context_length_mode: what a length in ``context_template_length_params`` counts.
            ``total`` (reference): all tokens of the generated text, the prefix's (and a BOS the tokenizer adds)
            included, as ``generate_fast(max_out_len=length)`` does: "The" (one token) with length 5 gets 4 new
            tokens. As there, all prefixes are sampled in one batch (top-k 5 from the softmax, renormalised, one
            ``torch.multinomial`` draw per step for the whole batch), a prefix generates while it is shorter than
            the length and nothing is generated once the longest prefix reaches it; the text is NFKD-normalised,
            blank lines become spaces and braces spaces (MEMIT; EasyEdit's ROME deletes them). ``new``: the
            length is the number of new tokens, sampled by ``model.generate`` per prefix (this toolkit's earlier
            behaviour; one more token per template at [[5, 5]] than the reference, and ``strip()``-ed text;
            other texts: on 5 SmolLM2 records ΔW's cosine to the reference's is 0.89 for ROME, 0.85 for MEMIT).
            Seeding: the reference codes sample from the global RNG (EasyEdit seeds it with 42 when imported;
            ROME and MEMIT never), so their templates depend on everything drawn before; here both modes seed a
            forked RNG with ``context_seed``, so the templates depend only on the model, tokenizer, lengths and
            seed. In both modes a count is split over the 5 prefixes as evenly as possible (the reference gives
            each prefix ``count // 5``: the same for multiples of 5, none at all below 5).
        v_step_count: optimiser steps for ``v_num_grad_steps = n``. ``n_minus_1`` (reference): the loop
            computes the loss n times and steps after all but the last (its ``if it == n - 1: break`` comes
            before the step), so n - 1 Adam steps; it stops earlier when the loss falls below ``loss_stop``
            (checked before each step, the reference's ``loss < 5e-2``). ``n``: n steps, the last loss unused
            (the earlier behaviour; ROME's ‖ΔW‖ 2% larger on SmolLM2 at n = 20, cosine 0.9998).
            Measured effects: ``eval/reports/rome_memit/README.md`` section 7.
    """

    context_length_mode: Literal["total", "new"] = "total"
    v_step_count: Literal["n_minus_1", "n"] = "n_minus_1"


@dataclasses.dataclass(kw_only=True)
class ZStarHyperParams(ReferenceLocateEditHyperParams):
    """The ``z*`` and key settings MEMIT and AlphaEdit share (MEMIT's defaults); see
    :class:`~shift_edit.algorithms.locate.memit.MEMITHyperParams` for their meaning,
    :class:`ReferenceLocateEditHyperParams`
    for ``context_length_mode`` and ``v_step_count``.

    Attributes:
        key_average: how a request's key ``k`` (FF2 input at the fact token) is averaged over the contexts.
            ``per_type`` (reference, MEMIT's and AlphaEdit's ``compute_ks``): the mean within each context type
            (the bare prompt; each ``[length, count]`` entry's generations), then the mean of those means, so with
            one entry the bare prompt weighs 1/2. ``flat``: the mean over all contexts (this toolkit's earlier
            behaviour; the bare prompt weighs 1/6 at ``[[5, 5]]``; ΔW's cosine to the reference's 0.985 on 5
            SmolLM2 records). ``z*`` is fitted on all contexts evenly in both (as the reference ``compute_z``).
    """

    clamp_norm_factor: float = 0.75
    context_template_length_params: list[list[int]] = dataclasses.field(default_factory=lambda: [[10, 5]])
    fact_token: Literal["subject_last", "subject_first", "last"] = "subject_last"
    zstar_cache: bool = False
    key_average: Literal["per_type", "flat"] = "per_type"


def reference_tags(hp: Mapping[str, Any]) -> list[str]:
    """Run tags of ROME/MEMIT/AlphaEdit's earlier semantics (issue 36), when chosen; runs made before the options
    existed have no such field and used them all."""
    return [tag for key, value, tag in (("context_length_mode", "new", "new-token contexts"),
                                        ("v_step_count", "n", "n steps"), ("key_average", "flat", "flat keys"))
            if hp.get(key) == value]
