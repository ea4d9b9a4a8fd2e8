"""The value of a subject-keyed edit: δ added to FF2's output at the subject's fact token, fitted by a few Adam
steps on the target's NLL over the prompt in several contexts (ROME's v* loss: NLL, KL on ``"{subject} is a"``,
weight decay and a norm clamp).

δ changes nothing before the fact token, so the text before it is computed once: the rows are left-padded so that
every row's fact token sits in the same column ``F``, one pass over columns ``< F`` fills a KV cache, and each
step re-runs only blocks ``L..`` on the columns from ``F`` on. The first prepared batch on a model is checked
against a plain pass (right padding, no cache); where they differ (an architecture whose cache or positions
behave otherwise) every later batch on that model uses plain rows: the same steps over whole prompts.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from ...core.requests import EditRequest
from ...model.architectures import ModelAdapter
from ...model.hooks import capture_inputs, head_only_at, owned_hooks
from ...model.resume import record_block_inputs, resume_at
from ...model.scoring import pad_id_of
from ..locate.contexts import encode_with_fact_index, prompt_template
from ..locate.zstar import clamped_step, v_loss

log = logging.getLogger(__name__)

#: per model object: may its batches use the KV cache (None: not checked yet)
_CACHE_OK: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()

#: the KL row's template (ROME's)
KL_TEMPLATE = "{} is a"


def _cache_arg(forward) -> str:
    """The name under which ``forward`` takes a KV cache (``cache`` in newer transformers models)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


@dataclasses.dataclass
class Rows:
    """The prompt in every context, teacher-forced on the target, plus the KL row, aligned at the fact token.

    ``prefix`` holds columns ``< F`` (left-padded; empty without the cache), ``suffix`` the rest (right-padded).
    ``at[r]``: the fact token's column in ``suffix``; ``target_cols[r]``: the suffix columns predicting the
    target's tokens (context rows), ``[kl_col]`` for the last row.
    """

    prefix: torch.Tensor
    suffix: torch.Tensor
    mask: torch.Tensor  # [n, F + S]
    pos_prefix: torch.Tensor
    pos_suffix: torch.Tensor
    at: list[int]
    target_cols: list[list[int]]

    @property
    def n_contexts(self) -> int:
        return len(self.at) - 1


def build_rows(tok, req: EditRequest, target: list[int], templates: Sequence[str], fact_token: str, *,
               cached: bool, device: torch.device) -> Rows:
    """:class:`Rows` for ``req`` in ``templates`` (row 0 should be the bare prompt, ``"{}"``)."""
    ptmpl, subject = prompt_template(req), req.subject or ""
    seqs, facts, cols = [], [], []
    for ctx in templates:
        ids, fact = encode_with_fact_index(tok, ctx.replace("{}", ptmpl, 1), subject, fact_token)
        seqs.append(ids + target[:-1])
        facts.append(fact)
        cols.append(list(range(len(ids) - 1, len(ids) - 1 + len(target))))
    ids, fact = encode_with_fact_index(tok, KL_TEMPLATE, subject, fact_token)
    seqs.append(ids)
    facts.append(fact)
    cols.append([len(ids) - 1])
    split = facts if cached else [0] * len(seqs)
    width_f = max(split)
    width_s = max(len(s) - c for s, c in zip(seqs, split))
    pad = pad_id_of(tok)
    n = len(seqs)
    prefix = torch.full((n, width_f), pad, dtype=torch.long)
    suffix = torch.full((n, width_s), pad, dtype=torch.long)
    mask = torch.zeros((n, width_f + width_s), dtype=torch.long)
    pos_prefix = torch.zeros((n, width_f), dtype=torch.long)
    pos_suffix = torch.zeros((n, width_s), dtype=torch.long)
    for r, (s, c) in enumerate(zip(seqs, split)):
        if c:
            prefix[r, width_f - c:] = torch.tensor(s[:c])
            mask[r, width_f - c: width_f] = 1
            pos_prefix[r, width_f - c:] = torch.arange(c)
        rest = s[c:]
        suffix[r, : len(rest)] = torch.tensor(rest)
        mask[r, width_f: width_f + len(rest)] = 1
        pos_suffix[r] = c + torch.arange(width_s)
    at = [f - c for f, c in zip(facts, split)]
    target_cols = [[x - c for x in col] for col, c in zip(cols, split)]
    to = dict(device=device)
    return Rows(prefix.to(**to), suffix.to(**to), mask.to(**to), pos_prefix.to(**to), pos_suffix.to(**to), at,
                target_cols)


@dataclasses.dataclass
class Prepared:
    """One request's rows after the no-grad passes: the cache, block inputs, keys and the unedited logits."""

    rows: Rows
    cache: object | None  # a transformers Cache over the prefix columns, or None
    block_in: list[torch.Tensor | None]  # per block: its input on the suffix columns
    keys: dict[str, torch.Tensor]  # FF1 module name -> [n_contexts, d] float64 MLP inputs at the fact token
    ff2_out: dict[str, torch.Tensor]  # FF2 module name -> [d] its output at the bare prompt's fact token
    logits: list[torch.Tensor]  # per row: [len(target_cols[r]), vocab] float32, unedited
    passes: int  # model calls spent
    model_forward: object = None  # the model's forward (which name its cache argument has)
    saved: list = dataclasses.field(default_factory=list)  # per cache layer: (keys, values) after the prefix pass

    def kwargs(self) -> dict:
        """The model's arguments for a pass over the suffix columns."""
        extra = ({_cache_arg(self.model_forward): self.cache, "use_cache": True, "position_ids": self.rows.pos_suffix}
                 if self.cache is not None else {"use_cache": False})
        return {"input_ids": self.rows.suffix, "attention_mask": self.rows.mask, **extra}

    def kwargs_for(self, idx: Sequence[int]) -> dict:
        """:meth:`kwargs` for the rows ``idx`` only (the cache's rows rebound to theirs until :meth:`reset_cache`)."""
        ii = torch.tensor(list(idx), device=self.rows.suffix.device)
        if self.cache is None:
            return {"input_ids": self.rows.suffix[ii], "attention_mask": self.rows.mask[ii], "use_cache": False}
        for layer, (keys, values) in zip(self.cache.layers, self.saved):
            layer.keys, layer.values = keys[ii], values[ii]
        return {"input_ids": self.rows.suffix[ii], "attention_mask": self.rows.mask[ii],
                _cache_arg(self.model_forward): self.cache, "use_cache": True,
                "position_ids": self.rows.pos_suffix[ii]}

    def reset_cache(self) -> None:
        """Drop what a pass over the suffix appended to the cache (each layer's keys and values as the prefix
        pass left them; the layers rebind, never modify, their tensors)."""
        if self.cache is not None:
            for layer, (keys, values) in zip(self.cache.layers, self.saved):
                layer.keys, layer.values = keys, values


@torch.no_grad()
def prepare(model: nn.Module, tok, adapter: ModelAdapter, req: EditRequest, target: list[int],
            templates: Sequence[str], fact_token: str, ff1_names: Sequence[str], ff2_names: Sequence[str], *,
            fit: tuple[nn.Module, ModelAdapter] | None = None) -> Prepared:
    """Run the no-grad passes for ``req`` (with the cache where this model allows it, checked on its first call).

    ``fit``: the model the value will be fitted on and its adapter, when not ``model`` (a low-precision copy,
    :mod:`~shift_edit.model.low_precision`): the rows' passes (cache, block inputs, unedited logits) run there, and
    the keys and FF2's output come from ``model`` in one more pass that stops after the highest listed layer
    (:func:`exact_keys`)."""
    if fit is not None:
        if _CACHE_OK.get(model) is None:  # settle once, at full precision, whether this model's cache works
            prepare(model, tok, adapter, req, target, templates, fact_token, ff1_names, ff2_names)
        low, low_adapter = fit
        prep = _prepare(low, tok, low_adapter, req, target, templates, fact_token, ff1_names, ff2_names,
                        cached=_CACHE_OK[model], device=next(low.parameters()).device)
        prep.keys, prep.ff2_out = exact_keys(model, tok, adapter, req, target, templates, fact_token, ff1_names,
                                             ff2_names)
        prep.passes += 1
        return prep
    device = next(model.parameters()).device
    ok = _CACHE_OK.get(model)
    if ok is None and "position_ids" not in inspect.signature(model.forward).parameters:
        ok = _CACHE_OK[model] = False
    try:
        prep = _prepare(model, tok, adapter, req, target, templates, fact_token, ff1_names, ff2_names,
                        cached=ok is not False, device=device)
    except (TypeError, ValueError, AttributeError, RuntimeError, IndexError) as exc:
        if ok is not None:  # a checked model: a real error
            raise
        log.info("SHIFT_SUBJECT: cached prefixes fail on %s (%s); using plain passes", type(model).__name__, exc)
        _CACHE_OK[model] = False
        return _prepare(model, tok, adapter, req, target, templates, fact_token, ff1_names, ff2_names,
                        cached=False, device=device)
    if ok is None:
        plain = _prepare(model, tok, adapter, req, target, templates, fact_token, ff1_names, ff2_names,
                         cached=False, device=device)
        same = all(torch.allclose(a, b, atol=1e-3, rtol=1e-3) for a, b in zip(prep.logits, plain.logits))
        _CACHE_OK[model] = same
        if not same:
            log.info("SHIFT_SUBJECT: cached prefixes disagree with plain passes on %s; using plain passes",
                     type(model).__name__)
            return plain
    return prep


@torch.no_grad()
def _prepare(model: nn.Module, tok, adapter: ModelAdapter, req: EditRequest, target: list[int],
             templates: Sequence[str], fact_token: str, ff1_names: Sequence[str], ff2_names: Sequence[str], *,
             cached: bool, device: torch.device) -> Prepared:
    rows = build_rows(tok, req, target, templates, fact_token, cached=cached, device=device)
    cache, passes, saved = None, 0, []
    if rows.prefix.shape[1]:
        cache = DynamicCache()
        width_f = rows.prefix.shape[1]
        model(input_ids=rows.prefix, attention_mask=rows.mask[:, :width_f], position_ids=rows.pos_prefix,
              use_cache=True, **{_cache_arg(model.forward): cache})
        passes += 1
        saved = [(layer.keys, layer.values) for layer in cache.layers]
    outs: dict[str, torch.Tensor] = {}
    n, at = len(rows.at), torch.tensor(rows.at)
    with owned_hooks() as hooks:
        for name in ff2_names:
            hooks.forward_hook(adapter.module(name), lambda _m, _a, o, name=name: outs.__setitem__(name, o.detach()))
        with record_block_inputs(adapter) as blocks, capture_inputs(model, list(ff1_names)) as cap, \
                head_only_at(model, tuple(rows.suffix.shape), rows.target_cols) as gather:
            logits = gather(model(**Prepared(rows, cache, [], {}, {}, [], 0, model.forward).kwargs()).logits)
    passes += 1
    prep = Prepared(rows, cache, list(blocks), {}, {}, [x.cpu() for x in logits], passes, model.forward, saved)
    prep.reset_cache()
    width = rows.suffix.shape[1]
    rr = torch.arange(n)
    for name, x in cap.inputs.items():
        prep.keys[name] = x.reshape(n, width, -1)[rr, at][: rows.n_contexts].double().cpu()
    for name, x in outs.items():
        prep.ff2_out[name] = x.reshape(n, width, -1)[0, rows.at[0]].float()
    return prep


@torch.no_grad()
def exact_keys(model: nn.Module, tok, adapter: ModelAdapter, req: EditRequest, target: list[int],
               templates: Sequence[str], fact_token: str, ff1_names: Sequence[str], ff2_names: Sequence[str]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:attr:`Prepared.keys` and :attr:`Prepared.ff2_out` from one pass of ``model`` over the whole rows that
    stops once the last of ``ff1_names`` and ``ff2_names`` is reached (FF2's output computed from its input)."""
    device = next(model.parameters()).device
    rows = build_rows(tok, req, target, templates, fact_token, cached=False, device=device)
    names = list(dict.fromkeys([*ff1_names, *ff2_names]))
    order = {name: i for i, (name, _m) in enumerate(model.named_modules())}
    last = max(names, key=order.__getitem__)
    with capture_inputs(model, names, stop_after=last) as cap:
        model(input_ids=rows.suffix, attention_mask=rows.mask, use_cache=False)
    n, width = len(rows.at), rows.suffix.shape[1]
    rr, at = torch.arange(n), torch.tensor(rows.at)
    at_fact = {name: cap.inputs[name].reshape(n, width, -1)[rr, at] for name in names}
    keys = {name: at_fact[name][: rows.n_contexts].double().cpu() for name in ff1_names}
    ff2_out = {name: adapter.module(name)(at_fact[name][:1])[0].float() for name in ff2_names}
    return keys, ff2_out


@dataclasses.dataclass
class Value:
    """The fitted δ and how it was found."""

    delta: torch.Tensor  # [d_model] float32, on the model's device
    steps: int  # optimiser steps (each a forward and a backward pass over blocks L..)
    losses: list[float]  # total loss before each step (and after the last, when it stopped early)
    forward_passes: int
    backward_passes: int


def step_rows(n_contexts: int, per_step: int | None, step: int) -> list[int] | None:
    """The rows one step of the value's fit runs: every row (None) or, with ``per_step`` contexts a step, the bare
    prompt (row 0), ``per_step`` of the generated contexts in turn and the KL row (the last)."""
    generated = n_contexts - 1
    if per_step is None or per_step >= generated:
        return None
    chosen = sorted({1 + (step * per_step + i) % generated for i in range(per_step)})
    return [0, *chosen, n_contexts]


class _Runner:
    """Passes over some of the prepared rows (blocks ``L..``, the KV cache's rows sliced to match) with δ added at
    each row's fact token (one δ for all rows, or one per row)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, layer: int, prep: Prepared):
        self.model, self.adapter, self.layer, self.prep = model, adapter, layer, prep
        self.width = prep.rows.suffix.shape[1]
        self.device = prep.rows.suffix.device
        self.at_all = torch.tensor(prep.rows.at, device=self.device)
        self.rows = torch.arange(len(prep.rows.at), device=self.device)
        self.at, self.delta = self.at_all, None

    def add(self, _m, _args, out):
        flat = out.dim() == 2
        o = out.view(len(self.rows), self.width, -1) if flat else out
        o = o.index_put((self.rows, self.at), o[self.rows, self.at] + self.delta.to(o.dtype))
        return o.view(out.shape) if flat else o

    def __call__(self, delta: torch.Tensor, idx: Sequence[int] | None) -> list[torch.Tensor]:
        """Logits at the target columns of rows ``idx`` (None: every row, the plain batch)."""
        prep, rows = self.prep, self.prep.rows
        if idx is None:
            kwargs, hidden, cols = prep.kwargs(), prep.block_in[self.layer], rows.target_cols
            self.rows, self.at = torch.arange(len(rows.at), device=self.device), self.at_all
        else:
            ii = torch.tensor(list(idx), device=self.device)
            kwargs, hidden = prep.kwargs_for(idx), prep.block_in[self.layer][ii]
            cols = [rows.target_cols[i] for i in idx]
            self.rows, self.at = torch.arange(len(idx), device=self.device), self.at_all[ii]
        self.delta = delta
        try:
            with resume_at(self.adapter, self.layer, hidden), \
                    head_only_at(self.model, (len(cols), self.width), cols) as gather:
                return gather(self.model(**kwargs).logits)
        finally:
            prep.reset_cache()


def _nll(picked: Sequence[torch.Tensor], tgt: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the target's mean token NLL (``picked``: per row ``[len(target), vocab]`` logits)."""
    logp = torch.log_softmax(torch.stack(list(picked)), -1)
    return -logp.gather(-1, tgt[None, :, None].expand(len(picked), -1, 1))[..., 0].mean(1).mean()


def vjp_start(run: _Runner, delta: torch.Tensor, tgt: torch.Tensor, kl_init: torch.Tensor, ref: torch.Tensor, hp,
              max_norm: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The starting δ along the VJP: one forward and backward pass gives the gradient ``g`` of the contexts' NLL at
    δ = 0; one batched forward pass scores ``-s · max_norm · g / ‖g‖`` for each ``s`` of ``v_start_scales`` on
    every row (the rows repeated once per scale) and keeps the one of least v* loss."""
    nc = run.prep.rows.n_contexts
    n = nc + 1
    picked = run(delta, None)
    grad, = torch.autograd.grad(_nll(picked[:nc], tgt), delta)
    u = -grad / grad.norm().clamp_min(1e-12)
    scales = list(hp.v_start_scales)
    cands = torch.stack([s * max_norm * u for s in scales])  # [k, d]
    with torch.no_grad():
        picked = run(cands.repeat_interleave(n, 0), [r for _ in scales for r in range(n)])
        losses = [float(v_loss(_nll(picked[k * n: k * n + nc], tgt), kl_init, picked[k * n + nc][0], cands[k], ref,
                               hp)) for k in range(len(scales))]
    best = min(range(len(scales)), key=losses.__getitem__)
    return cands[best], losses[best]


def fit_value(model: nn.Module, adapter: ModelAdapter, layer: int, prep: Prepared, target: list[int], hp,
              n_steps: int | None = None) -> Value:
    """Fit δ at FF2 of ``layer`` (``hp``: ROME's ``v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor,
    kl_factor, loss_stop``; ``n_steps`` instead of ``v_num_grad_steps`` if given; ``v_contexts_per_step`` if set:
    each step runs the bare prompt, that many of the generated contexts in turn, and the KL row;
    ``v_start_scales`` if set: start from :func:`vjp_start` instead of 0)."""
    rows = prep.rows
    device = rows.suffix.device
    ff2 = adapter.module(adapter.ff2_name(layer))
    ref = prep.ff2_out[adapter.ff2_name(layer)]
    nc = rows.n_contexts
    tgt = torch.tensor(target, device=device)
    kl_init = torch.log_softmax(prep.logits[nc][0].to(device), -1)
    delta = torch.zeros(ref.shape[0], device=device, requires_grad=True)
    run = _Runner(model, adapter, layer, prep)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _f in flags:
        p.requires_grad_(False)
    max_norm = hp.clamp_norm_factor * ref.norm()
    per_step = getattr(hp, "v_contexts_per_step", None)
    losses: list[float] = []
    steps = passes = backward = 0
    try:
        with owned_hooks() as hooks:
            hooks.forward_hook(ff2, run.add)
            if getattr(hp, "v_start_scales", None):
                start, _loss = vjp_start(run, delta, tgt, kl_init, ref, hp, max_norm)
                with torch.no_grad():
                    delta.copy_(start)
                passes, backward = passes + 2, backward + 1
            opt = torch.optim.Adam([delta], lr=hp.v_lr)
            for step in range(hp.v_num_grad_steps if n_steps is None else n_steps):
                opt.zero_grad()
                idx = step_rows(nc, per_step, step)
                picked = run(delta, idx)
                passes += 1
                k = len(picked) - 1
                loss = v_loss(_nll(picked[:k], tgt), kl_init, picked[k][0], delta, ref, hp)
                losses.append(float(loss.detach()))
                if losses[-1] < hp.loss_stop:
                    break
                clamped_step(opt, delta, loss, max_norm)
                steps += 1
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    return Value(delta.detach().float(), steps, losses, passes, backward + steps)
