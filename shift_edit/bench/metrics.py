"""Per-record CounterFact metrics, n-gram entropy, generation and WikiText perplexity.

Metric families (every number says which one it belongs to):

- ``rome``: ROME's probability comparisons from mean token NLLs (teacher forcing).
  ES/PS = fraction of rewrite/paraphrase prompts with NLL(new) < NLL(true); NS = fraction of
  neighborhood prompts with NLL(true) < NLL(new). Magnitudes EM/PM = mean of
  exp(-NLL(new)) - exp(-NLL(true)), NM = mean of exp(-NLL(true)) - exp(-NLL(new)).
- ``top1``: strict top-1 accuracy (MEMIT; Backward Lens Table 6): a prompt counts only if
  every token of the correct object is the argmax at its teacher-forced position; the
  correct object is target_new for rewrite/paraphrase and target_TRUE for neighborhood.
  ``top1_first`` is the first-token-only variant.
- ``neighborhood_kl``: KL(unedited || edited) of the next-token distributions after each
  neighborhood prompt (nats), averaged over prompts.
- ``generation``: ROME's n-gram entropy, see :func:`ngram_entropy`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..requests import encode_prompt, encode_target
from ..scoring import ContinuationPlan, ContinuationScore, head_only_at, logits_at_positions, pad_batch, pad_id_of
from .data import CounterFactCase

#: prompt groups scored per record, with the object that counts as correct in top-1
GROUPS = ("rewrite", "paraphrase", "rephrase", "neighborhood")


def case_prompts(case: CounterFactCase) -> dict[str, tuple[str, ...]]:
    """The prompt groups of a case (empty groups dropped)."""
    groups = {
        "rewrite": case.rewrite_prompts,
        "paraphrase": case.paraphrase_prompts,
        "rephrase": case.rephrase_prompts,
        "neighborhood": case.neighborhood_prompts,
    }
    return {k: v for k, v in groups.items() if v}


def _targets(case: CounterFactCase, group: str) -> tuple[str, str]:
    """(new, true) objects for a prompt group."""
    if group == "neighborhood":
        return case.request.target_new, case.neighborhood_true
    return case.request.target_new, case.request.target_true


@dataclass
class _Part:
    """Pairs scored together: their plan and, per pair, the prompt group it belongs to."""

    pairs: list[tuple[list[int], list[int]]]
    groups: list[str]
    plan: ContinuationPlan | None = None


class CaseScorer:
    """A record's forward passes, planned once: every (prompt, new) and (prompt, true) pair,
    with shared prefixes read off one pass (:class:`~shift_edit.scoring.ContinuationPlan`).

    Two parts are planned separately: ``near`` (neighborhood prompts, whose unedited
    next-token distribution the KL needs in full) and ``edit`` (rewrite, paraphrase and
    rephrase prompts, which the unedited pass only needs up to the edited block). The logits
    at the last position of each neighborhood prompt are among the planned positions, so
    scoring and the KL share one pass.
    """

    PARTS = ("near", "edit")

    def __init__(self, tok, case: CounterFactCase, *, share_prefixes: bool = True) -> None:
        self.parts = {name: _Part([], []) for name in self.PARTS}
        for group, prompts in case_prompts(case).items():
            part = self.parts["near" if group == "neighborhood" else "edit"]
            new, true = _targets(case, group)
            for p in prompts:
                ids = encode_prompt(tok, p)
                part.pairs += [(ids, encode_target(tok, p, new)), (ids, encode_target(tok, p, true))]
                part.groups.append(group)
        for part in self.parts.values():
            part.plan = ContinuationPlan.build(part.pairs, share_prefixes=share_prefixes)
        self.pad_id = pad_id_of(tok)

    @property
    def n_neighborhood(self) -> int:
        return len(self.parts["near"].groups)

    def logits(
        self, model: nn.Module, *, batch_size: int = 64, chunk_context=None, parts: Sequence[str] = PARTS,
    ) -> dict[str, list[torch.Tensor | None]]:
        """Logits at every planned position of ``parts`` (see
        :func:`~shift_edit.scoring.logits_at_positions`); ``chunk_context(part, k)`` wraps batch k."""
        out = {}
        for name in parts:
            plan = self.parts[name].plan
            ctx = None if chunk_context is None else (lambda k, name=name: chunk_context(name, k))
            out[name] = logits_at_positions(model, plan.seqs, plan.positions, pad_id=self.pad_id,
                                            batch_size=batch_size, chunk_context=ctx)
        return out

    def scores(self, logits: dict[str, list[torch.Tensor]]) -> dict[str, list[tuple[ContinuationScore, ContinuationScore]]]:
        """(new, true) scores per prompt group, as :func:`score_case` returns them."""
        out: dict[str, list] = {}
        for name in ("edit", "near"):
            part = self.parts[name]
            flat = part.plan.scores(logits[name], part.pairs)
            for j, group in enumerate(part.groups):
                out.setdefault(group, []).append((flat[2 * j], flat[2 * j + 1]))
        return {g: out[g] for g in GROUPS if g in out}

    def neighborhood_logprobs(self, logits: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Next-token log-probabilities after each neighborhood prompt, ``[n, vocab]``."""
        plan = self.parts["near"].plan
        rows = []
        for i in range(0, len(plan.reads), 2):  # (prompt, new) of each prompt: its first read is the prompt's end
            j, offsets = plan.reads[i]
            rows.append(logits["near"][j][offsets[0]])
        if not rows:
            return torch.zeros(0)
        return torch.log_softmax(torch.stack(rows), dim=-1).cpu()


def score_case(
    model: nn.Module, tok, case: CounterFactCase, *, batch_size: int = 64, share_prefixes: bool = True
) -> dict[str, list[tuple[ContinuationScore, ContinuationScore]]]:
    """Teacher-forced (new, true) scores for every prompt of a case, all in batches
    (``batch_size=1, share_prefixes=False``: one forward pass per (prompt, target) pair)."""
    scorer = CaseScorer(tok, case, share_prefixes=share_prefixes)
    return scorer.scores(scorer.logits(model, batch_size=batch_size))


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs))


def metrics_from_scores(scores: dict[str, list[tuple[ContinuationScore, ContinuationScore]]]) -> dict:
    """ROME and top-1 metrics (values in [0, 1]) plus the raw NLLs, from :func:`score_case` output."""
    rome: dict[str, float] = {}
    top1: dict[str, float] = {}
    top1_first: dict[str, float] = {}
    nlls: dict[str, list[dict[str, float]]] = {}
    correct: dict[str, list[bool]] = {}  # per prompt, strict top-1 (MEMIT's *_prompts_correct; export)
    for group, rows in scores.items():
        nll = [(n.mean_nll, t.mean_nll) for n, t in rows]
        nlls[group] = [{"target_new": a, "target_true": b} for a, b in nll]
        correct[group] = [t.all_correct if group == "neighborhood" else n.all_correct for n, t in rows]
        if group == "neighborhood":
            rome[f"{group}_success"] = _mean([float(b < a) for a, b in nll])
            rome[f"{group}_magnitude"] = _mean([math.exp(-b) - math.exp(-a) for a, b in nll])
            top1[f"{group}_acc"] = _mean([float(t.all_correct) for _, t in rows])
            top1_first[f"{group}_acc"] = _mean([float(t.first_correct) for _, t in rows])
        else:
            rome[f"{group}_success"] = _mean([float(a < b) for a, b in nll])
            rome[f"{group}_magnitude"] = _mean([math.exp(-a) - math.exp(-b) for a, b in nll])
            top1[f"{group}_acc"] = _mean([float(n.all_correct) for n, _ in rows])
            top1_first[f"{group}_acc"] = _mean([float(n.first_correct) for n, _ in rows])
    return {"rome": rome, "top1": top1, "top1_first": top1_first, "nll": nlls, "top1_correct": correct}


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tok, prompts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt, ``[n, vocab]`` float32 on CPU."""
    device = next(model.parameters()).device
    seqs = [encode_prompt(tok, p) for p in prompts]
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        ids, mask = pad_batch(chunk, pad_id_of(tok), device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        last = torch.tensor([len(c) - 1 for c in chunk], device=device)
        out.append(torch.log_softmax(logits[torch.arange(len(chunk), device=device), last].float(), -1).cpu())
    return torch.cat(out)


def kl_divergence(logp_ref: torch.Tensor, logp_new: torch.Tensor) -> torch.Tensor:
    """KL(ref || new) per row, in nats."""
    return (logp_ref.exp() * (logp_ref - logp_new)).sum(-1).clamp_min(0.0)


# --------------------------------------------------------------------------- generation

def word_tokens(text: str) -> list[str]:
    """nltk's word tokenizer (:class:`nltk.tokenize.NLTKWordTokenizer`) on the whole text.

    ROME calls ``nltk.word_tokenize``, which first splits sentences with the punkt model
    (a data download) and then runs ``NLTKWordTokenizer`` on each sentence. We run that
    same word tokenizer on the whole text (``word_tokenize(text, preserve_line=True)``), so
    no download is needed. The only difference is a period that ends a sentence inside the
    text: punkt splits it off as its own token, the word tokenizer alone only does so at
    the end of the text.
    """
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize(text)


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return float(-sum((c / total) * math.log2(c / total) for c in counts.values()))


def text_ngram_entropy(text: str) -> float:
    """ROME's per-text n-gram entropy: mean(2/3 * H2, 4/3 * H3), H_n in bits over word n-grams."""
    toks = word_tokens(text)
    hs = []
    for n, w in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        hs.append(w * _entropy_bits(grams))
    return float(sum(hs) / len(hs))


def ngram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of :func:`text_ngram_entropy` over texts (ROME's ``n_gram_entropy``)."""
    return float(sum(text_ngram_entropy(t) for t in texts) / len(texts))


@torch.no_grad()
def generate_topk(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """ROME's generation protocol: top-k sampling until ``max_length`` tokens in total
    (prompt included, no stop at EOS), batched with left padding and a KV cache.

    Returns the decoded full texts (prompt + continuation), NFKD-normalised with blank
    lines turned into spaces. Deterministic for a given seed, prompts and batch.
    """
    return generate_topk_groups(model, tok, [GenerationGroup(list(prompts), seed)], max_length=max_length,
                                top_k=top_k)[0]


@dataclass
class GenerationGroup:
    """One record's generation: its prompts, its sampling seed, and the edit to apply to its
    rows only (``deltas``: :class:`~shift_edit.deltas.WeightDelta` s; empty = the model as is)."""

    prompts: list[str]
    seed: int
    deltas: list = field(default_factory=list)


@contextlib.contextmanager
def _row_deltas(model: nn.Module, groups: Sequence[GenerationGroup], rows: Sequence[slice], batch: int):
    """Forward hooks that add each group's weight deltas to its own rows' module outputs:
    ``y_rows += x_rows @ ΔWᵀ`` (low rank: ``(x_rows @ rightᵀ) @ leftᵀ``), so records edited
    differently share one decoding batch."""
    by_module: dict[str, list[tuple[slice, object]]] = {}
    for g, sl in zip(groups, rows):
        for d in g.deltas:
            by_module.setdefault(d.module, []).append((sl, d))
    handles = []

    def make(entries):
        def hook(_module, args, output):
            x = args[0]
            flat = output.dim() == 2  # OPT flattens [batch, seq, d] inside its MLP
            y = output.view(batch, -1, output.shape[-1]) if flat else output
            xv = x.view(batch, -1, x.shape[-1]) if flat else x
            y = y.clone()
            for sl, d in entries:
                xr = xv[sl].to(torch.float32)
                if d.dense is not None:
                    add = xr @ d.dense.to(xr.device).T
                else:
                    add = (xr @ d.right.to(xr.device).T) @ d.left.to(xr.device).T
                y[sl] = y[sl] + add.to(y.dtype)
            return y.view_as(output) if flat else y

        return hook

    try:
        for name, entries in by_module.items():
            handles.append(model.get_submodule(name).register_forward_hook(make(entries)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def generate_topk_groups(
    model: nn.Module,
    tok,
    groups: Sequence[GenerationGroup],
    *,
    max_length: int = 100,
    top_k: int = 5,
) -> list[list[str]]:
    """:func:`generate_topk` for several records in one decoding batch.

    Each group's rows see the model plus that group's deltas (added to those rows' module
    outputs by hooks) and draw from the group's own seeded generator, so a group's texts do
    not depend on the other groups' sampling. Decoding on a CPU is bound by reading the
    weights once per step, so a batch of several records costs little more than one.
    """
    device = next(model.parameters()).device
    seqs = [encode_prompt(tok, p) for g in groups for p in g.prompts]
    rows, at = [], 0
    for g in groups:
        rows.append(slice(at, at + len(g.prompts)))
        at += len(g.prompts)
    ids, mask = pad_batch(seqs, pad_id_of(tok), device, left=True)
    gens = [torch.Generator(device="cpu").manual_seed(int(g.seed)) for g in groups]
    # as for one record alone: a record's rows all get max_length minus its longest prompt new tokens
    n_new_of = [max(0, max_length - max(len(seqs[i]) for i in range(sl.start, sl.stop))) for sl in rows]
    n_new = max(n_new_of)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = [list(s) for s in seqs]
    past = None
    step_ids, step_pos = ids, pos
    # the KV cache's name: `cache` in current transformers, `past_key_values` before (and deprecated since)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with _row_deltas(model, groups, rows, len(seqs)):
        for _ in range(n_new):
            # the head runs at the last position only (the prompt step would otherwise make
            # [rows, prompt length, vocab] logits)
            with head_only_at(model, tuple(step_ids.shape), [[step_ids.shape[1] - 1]] * len(seqs)) as gather:
                res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                            **{cache_kw: past})
                logits = torch.cat(gather(res.logits)).cpu()
            past = res[cache_kw] if cache_kw in res.keys() else None
            vals, idx = logits.topk(top_k, dim=-1)
            probs = vals.softmax(-1)
            choice = torch.cat([torch.multinomial(probs[sl], 1, generator=g) for sl, g in zip(rows, gens)])
            nxt = idx.gather(1, choice)
            for row, t in zip(out, nxt[:, 0].tolist()):
                row.append(t)
            step_ids = nxt.to(device)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    for sl, k in zip(rows, n_new_of):  # tokens past a record's own length are dropped (drawn later: no effect)
        for i in range(sl.start, sl.stop):
            out[i] = out[i][: len(seqs[i]) + k]
    texts = [unicodedata.normalize("NFKD", tok.decode(r, skip_special_tokens=True)).replace("\n\n", " ") for r in out]
    return [texts[sl] for sl in rows]


# --------------------------------------------------------------------------- perplexity

@dataclass(frozen=True)
class PerplexityProtocol:
    """How WikiText perplexity is computed.

    ``paper``: the first ``n_lines`` test lines with at least ``min_chars`` characters
    (after stripping), each truncated to ``max_tokens`` tokens; the mean of per-line
    perplexities (Backward Lens / ROME-style). ``standard``: the non-blank lines joined
    with newlines into one text, scored with windows of ``window`` tokens moved by
    ``stride`` (only the new tokens of each window count); exp of the token-weighted mean NLL.
    """

    name: str = "paper"
    n_lines: int = 100
    min_chars: int = 30
    max_tokens: int = 256
    window: int = 1024
    stride: int = 512

    def to_dict(self) -> dict:
        if self.name == "paper":
            return {"name": "paper", "n_lines": self.n_lines, "min_chars": self.min_chars, "max_tokens": self.max_tokens}
        return {"name": "standard", "window": self.window, "stride": self.stride}


def read_wikitext_lines(path: str | None = None) -> list[str]:
    """Non-blank WikiText-2 raw test lines, from a local text file or (``path=None``) via ``datasets``."""
    from ..errors import ShiftEditError

    if path is not None:
        try:
            text = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ShiftEditError(f"cannot read WikiText file {path}: {exc}") from None
        lines = text.replace("\r\n", "\n").split("\n")
    else:  # pragma: no cover - needs internet
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        lines = [t.rstrip("\n") for t in ds["text"]]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise ShiftEditError(f"WikiText source {path or 'datasets'} has no text")
    return lines


@torch.no_grad()
def perplexity(model: nn.Module, tok, lines: Sequence[str], protocol: PerplexityProtocol, *, batch_size: int = 1) -> float:
    """WikiText perplexity under ``protocol`` (see :class:`PerplexityProtocol`).

    ``batch_size`` lines per forward pass (paper protocol): the logits of a batch are
    ``batch_size x 256 x vocab`` floats (50 MB a line for SmolLM2's 49k vocabulary), so the
    default of one line keeps the benchmark's peak memory near the model's size.
    """
    device = next(model.parameters()).device
    if protocol.name == "paper":
        chosen = [ln for ln in lines if len(ln.strip()) >= protocol.min_chars][: protocol.n_lines]
        seqs = [encode_prompt(tok, ln)[: protocol.max_tokens] for ln in chosen]
        seqs = [s for s in seqs if len(s) >= 2]
        ppls = []
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            ids, mask = pad_batch(chunk, pad_id_of(tok), device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            # log p(next) = logit - logsumexp: no second [batch, len, vocab] tensor
            logp = logits.gather(-1, ids[:, 1:, None])[..., 0] - torch.logsumexp(logits, -1)
            del logits
            m = mask[:, 1:].float()
            nll = -(logp * m).sum(1) / m.sum(1)
            ppls.extend(torch.exp(nll).tolist())
        return float(sum(ppls) / len(ppls))
    if protocol.name == "standard":
        ids = encode_prompt(tok, "\n".join(lines))
        max_pos = getattr(model.config, "max_position_embeddings", None) or protocol.window
        window = min(protocol.window, int(max_pos))
        stride = min(protocol.stride, window)
        total, count, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            chunk = torch.tensor([ids[begin:end]], device=device)
            logits = model(input_ids=chunk, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, chunk[0, 1:, None])[:, 0]
            new_from = max(prev_end - begin, 0)  # targets at positions >= prev_end are new
            sel = logp[max(new_from - 1, 0) :]
            total += float(-sel.sum())
            count += sel.numel()
            prev_end = end
            if end == len(ids):
                break
        return float(math.exp(total / count))
    raise ValueError(f"unknown perplexity protocol {protocol.name!r}")
