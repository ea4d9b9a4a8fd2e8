"""Sequential (lifelong) editing: T records' edits applied in order, B at a time, never undone.

Each batch of B requests is computed on the model as the earlier batches left it (any registered
algorithm; those registered with ``uses_memory`` get the run's :class:`~shift_edit.core.memory.EditMemory`).
At every checkpoint (``eval_at``, and T) all records edited so far are scored on the current model in
the metric families (ROME probability comparisons, strict top-1, and unless ``skip_wild`` the WILD-style
free generation of :mod:`.wild`); the neighborhood is always scored
against the record's TRUE object, never against the edited model. The same records are also scored
on the unedited model — the edited matrices' original values are swapped in place for that pass and
back, each record once — so every checkpoint has its unedited reference on the same records. WikiText
perplexity is measured at each checkpoint and once on the unedited model.

A checkpoint falls after the batch that reaches it: with B = 100 a checkpoint at 10 is measured
after 100 edits (``n_edits`` in each checkpoint says how many were made). T need not be a multiple
of B: the last batch is smaller.

Run directory ``<out>/<ALG>/seq_<NNN>/`` (chosen by the same match-key rule as one-edit runs):
``params.json``; ``checkpoints/ckpt_<n>.json`` (per-record values and means at n edits);
``summary.json`` (all checkpoints' means, the unedited reference, speed, memory and the norms of
the edited matrices); ``state/`` (the current values of the edited parameters, the memory and the
position, with their sha256), written atomically every ``save_every`` edits and at every checkpoint;
a state that fails its checksums is refused in one line (it cannot be rebuilt; delete it to start
again). A run killed at any point continues from its last state and gives the same numbers as an
uninterrupted run (statistics are pinned to the unedited model, each batch is seeded by its index, and
ROME/MEMIT's context texts are sampled from the unedited model before any saved weights are loaded).

Per edit, the cost is the algorithm's edit plus the checkpoints' scoring; nothing per edit grows
with T (no model copy; records are tokenised once; only the edited matrices are saved).
"""

from __future__ import annotations

import json
import logging
import random
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.deltas import restore_weights
from ..core.editing import edit
from ..core.errors import EditRefusedError, ShiftEditError
from ..core.hparams import HyperParams
from ..core.memory import EditMemory
from ..core.registry import algorithm_for_hparams, get_algorithm
from ..files.io import atomic_write_json, model_fingerprint, provenance
from ..model.covariance import layer_stats
from ..model.stats_pinning import pinned_statistics
from .counterfact import CounterFactCase
from .seq_scoring import CounterFactScoring, record_means, record_values
from .seq_state import SequentialState, load_state, save_state
from .wikitext import PerplexityProtocol, perplexity, read_wikitext_lines
from .wild import DEFAULT_MAX_NEW_TOKENS, WildJob, WildPrompts, run_wild, wild_prompts
from .wild import protocol as wild_protocol

log = logging.getLogger(__name__)

SEQ_PROTOCOL_VERSION = 1


@dataclass
class SequentialConfig:
    """What a sequential run computes (all of it goes into ``params.json``).

    Attributes:
        alg / hparams: the algorithm and its hparams.
        total: T, the number of records edited.
        batch_edits: B, requests per edit call (the last batch may be smaller).
        eval_at: checkpoints (numbers of edits); T is always one.
        seed: seeds each batch's edit (``seed * 1_000_003 + batch index``).
        shuffle_seed: ``None``: records in data order; else shuffled with this seed first.
        ppl_protocol / wikitext: perplexity at each checkpoint (``ppl=False``: none).
        batch_size: prompts per forward pass when scoring.
        save_every: save the resumable state at least every this many edits (and at checkpoints).
        skip_wild / wild_max_new_tokens / wild_neighborhood / wild_records: the WILD-style free-generation
            family (:mod:`.wild`) at each checkpoint: off, new tokens per prompt, neighborhood prompts too,
            records per decoding batch.
    """

    alg: str
    hparams: HyperParams
    total: int
    batch_edits: int = 1
    eval_at: list[int] = field(default_factory=list)
    seed: int = 0
    shuffle_seed: int | None = None
    ppl: bool = True
    ppl_protocol: PerplexityProtocol = field(default_factory=lambda: PerplexityProtocol(n_lines=20))
    wikitext: str | None = None
    batch_size: int = 64
    save_every: int = 50
    skip_wild: bool = False
    wild_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    wild_neighborhood: bool = False
    wild_records: int = 8

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ShiftEditError(f"--sequential must be >= 1 (the number of records to edit), got {self.total}")
        if self.batch_edits < 1:
            raise ShiftEditError(f"--batch-edits must be >= 1, got {self.batch_edits}")
        bad = [n for n in self.eval_at if not 1 <= int(n) <= self.total]
        if bad:
            raise ShiftEditError(f"--eval-at values must be between 1 and T={self.total}, got {bad}")
        if self.save_every < 1:
            raise ShiftEditError(f"--save-every must be >= 1, got {self.save_every}")
        if self.wild_max_new_tokens < 1:
            raise ShiftEditError(f"--wild-max-new-tokens must be >= 1, got {self.wild_max_new_tokens}")
        if self.wild_records < 1:
            raise ShiftEditError(f"--wild-records must be >= 1, got {self.wild_records}")

    def checkpoints(self) -> list[int]:
        return sorted({int(n) for n in self.eval_at} | {self.total})

    def protocol(self) -> dict[str, Any]:
        out = {
            "version": SEQ_PROTOCOL_VERSION,
            "sequential": {"T": self.total, "B": self.batch_edits, "eval_at": self.checkpoints(),
                           "shuffle_seed": self.shuffle_seed, "seed": self.seed,
                           "how": "batches of B records' requests applied in order, each computed on the model the "
                                  "earlier batches left, never undone; at each checkpoint every record edited so far "
                                  "is "
                                  "scored on the current model and on the unedited weights"},
            "metric_families": {
                "rome": "ES/PS/NS from mean token NLLs of target_new vs target_true (teacher forcing); "
                        "neighborhood: P(true) > P(new) on neighborhood prompts (TRUE object, not the edited model)",
                "top1": "strict top-1: every token of the correct object is the argmax (neighborhood: TRUE object)",
                "top1_first": "first-token-only top-1",
                "perplexity": self.ppl_protocol.to_dict() if self.ppl else None,
                "not_computed": "neighborhood KL (the unedited distributions of all T records would be kept: "
                                "49k floats per prompt); n-gram entropy and ROME's consistency (needs the reference "
                                "texts and IDF table CounterFact's attribute_snippets come with, not in our data)",
            },
            "wikitext": self.wikitext if self.ppl else None,
        }
        if not self.skip_wild:  # absent (not None) when off: runs made before the family existed still match
            out["metric_families"]["wild"] = wild_protocol(self.wild_max_new_tokens, self.wild_neighborhood)
            out["wild"] = {"max_new_tokens": self.wild_max_new_tokens, "neighborhood": self.wild_neighborhood,
                           "records_per_decoding_batch": self.wild_records,
                           "how": "at each checkpoint on every record edited so far, on the current model and (each "
                                  "record once) on the unedited weights"}
        return out


def order_cases(cases: Sequence[CounterFactCase], total: int, shuffle_seed: int | None) -> list[CounterFactCase]:
    """The first ``total`` records in data order, or after a seeded shuffle."""
    if total > len(cases):
        raise ShiftEditError(f"--sequential {total} needs {total} records, the selection has {len(cases)}")
    pool = list(cases)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(pool)
    return pool[:total]


def _prime(model: nn.Module, tok, hparams: HyperParams) -> None:
    """Everything an algorithm derives from the unedited model once: the second-moment statistics
    (pinned for the run) and what the algorithm's own ``prime`` reads (ROME/MEMIT/AlphaEdit: their context texts;
    SHIFT_NEURON: its MLP-input statistics and generic sample), before any edit or saved state."""
    layers = getattr(hparams, "layers", None)
    if layers and getattr(hparams, "mom2_n_tokens", None) and getattr(hparams, "mom2_adjustment", True):
        layer_stats(model, tok, layers, corpus=hparams.mom2_corpus, n_tokens=hparams.mom2_n_tokens,
                    max_length=hparams.mom2_max_length, dtype=hparams.mom2_dtype)
    prime = algorithm_for_hparams(hparams).prime
    if prime is not None:
        prime(model, tok, hparams)


def _rss_mb() -> dict[str, float]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        cur = pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        cur = None
    return {"rss_mb": cur, "peak_rss_mb": peak}


def _norms(model: nn.Module, originals: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    with torch.no_grad():
        for name, w0 in originals.items():
            w = model.get_parameter(name).detach().float().cpu()
            d = w - w0.float()
            out[name] = {
                "delta_fro": float(d.norm()),
                "weight_fro": float(w.norm()),
                "base_fro": float(w0.float().norm()),
                "delta_spectral": float(torch.linalg.matrix_norm(d, ord=2)) if d.ndim == 2 else float(d.norm()),
            }
    return out


def _swap(model: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy ``values`` into the named parameters in place; returns what was there."""
    before = {name: model.get_parameter(name).detach().clone() for name in values}
    restore_weights(model, values)
    return before


# length: the run's one loop: resume the saved state, edit batch after batch, checkpoint, save; the state it carries
#   between those steps is the run itself (the steps are helpers: _checkpoint, save_state, _wild)
def run_sequential(
    model: nn.Module,
    tok,
    cases: Sequence[CounterFactCase],
    cfg: SequentialConfig,
    out: str | Path,
    *,
    data_info: dict[str, Any],
    model_name: str,
    progress: bool = True,
    scoring: Any = None,
) -> Path:
    """Edit ``cfg.total`` records sequentially into ``<out>/<ALG>/seq_<NNN>/``; returns the run dir.

    ``scoring``: how records are scored (default :class:`CounterFactScoring`; zsRE / KnowEdit:
    :class:`.fact_sequential.FactScoring`, whose records have no WILD-style family).

    A run dir with the same configuration continues from its saved state (or is left as it is when
    finished).

    Raises:
        ShiftEditError: bad configuration, T larger than the selection, or a saved state of other weights.
    """
    alg = get_algorithm(cfg.alg)
    scoring = CounterFactScoring() if scoring is None else scoring
    if not isinstance(scoring, CounterFactScoring) and not cfg.skip_wild:
        raise ShiftEditError("the WILD-style family scores CounterFact records only: pass --skip-wild")
    order = order_cases(cases, cfg.total, cfg.shuffle_seed)
    model.eval()
    base_fp = model_fingerprint(model)
    prov = provenance(model)
    match = {
        "alg": cfg.alg, "hparams": cfg.hparams.to_dict(),
        "model": {"name": model_name, "fingerprint": base_fp, "dtype": prov["model"]["dtype"]},
        "seed": cfg.seed, "protocol": scoring.protocol(cfg.protocol()), "data_sha256": data_info.get("sha256"),
        "order": [c.case_id for c in order],
    }
    params = {"match": match, "data": data_info, "provenance": prov,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    run_dir = _choose_seq_dir(Path(out), cfg.alg, match, params)
    state_dir, ckpt_dir = run_dir / "state", run_dir / "checkpoints"
    if (run_dir / "summary.json").is_file() and json.loads((run_dir / "summary.json").read_text()).get("finished"):
        log.info("%s is finished", run_dir)
        return run_dir
    ppl_lines = read_wikitext_lines(cfg.wikitext) if cfg.ppl else None
    with pinned_statistics(model, base_fp):
        _prime(model, tok, cfg.hparams)
        scorers = scoring.prepare(model, tok, order)  # once, on the unedited model (KnowEdit: its locality reference)
        loaded = load_state(state_dir, model, base_fp)
        st, memory, originals = loaded if loaded is not None else (SequentialState(), EditMemory(), {})
        if loaded is not None:
            log.info("%s: resuming after %d edits", run_dir, st.n_edits)
        if cfg.ppl and st.unedited_ppl is None:
            st.unedited_ppl = perplexity(model, tok, ppl_lines, cfg.ppl_protocol)
        wild = None if cfg.skip_wild else [wild_prompts(c, neighborhood=cfg.wild_neighborhood) for c in order]
        batches = [order[b : b + cfg.batch_edits] for b in range(0, len(order), cfg.batch_edits)]
        pending = [n for n in cfg.checkpoints() if n > st.n_edits or not (ckpt_dir / f"ckpt_{n}.json").is_file()]
        since_save = 0
        bar = tqdm(total=cfg.total, initial=st.n_edits, desc=f"{cfg.alg} sequential", unit="edit", disable=not progress)
        with bar:
            while st.n_batches < len(batches) or pending:
                if st.n_batches < len(batches) and not (pending and pending[0] <= st.n_edits):
                    batch = batches[st.n_batches]
                    torch.manual_seed(cfg.seed * 1_000_003 + st.n_batches)
                    t0 = time.perf_counter()
                    refused = None
                    try:
                        result = edit(model, tok, [c.request for c in batch], cfg.hparams,
                                      memory=memory if alg.uses_memory else None)
                    except EditRefusedError as err:  # the guard: the batch is not applied, its records count
                        refused, result = str(err), None
                        log.warning("batch %d refused by the edit guard (not applied): %s", st.n_batches, err)
                    dt = time.perf_counter() - t0
                    for name, orig in (result.orig_weights.items() if result is not None else ()):
                        if name not in originals:
                            originals[name] = orig.clone()
                            st.touched.append(name)
                    info = result.info if result is not None else []  # per request: what the algorithm decided
                    del result  # its copies of the original weights are not needed (never undone)
                    st.batches.append({"batch": st.n_batches, "n": len(batch), "edit_s": dt, "info": info,
                                       **({"refused": refused} if refused is not None else {})})
                    st.n_batches += 1
                    st.n_edits += len(batch)
                    since_save += len(batch)
                    bar.update(len(batch))
                    due = bool(pending and pending[0] <= st.n_edits)
                    if not due and (since_save >= cfg.save_every or st.n_batches == len(batches)):
                        save_state(state_dir, st, model, memory, base_fp)
                        since_save = 0
                    continue
                n = pending.pop(0)
                ck = _checkpoint(model, tok, order, scorers, st, originals, cfg, ppl_lines, memory, wild, scoring)
                ck["checkpoint"] = n
                atomic_write_json(ckpt_dir / f"ckpt_{n}.json", ck)
                st.checkpoints = [c for c in st.checkpoints if c["checkpoint"] != n] + [
                    {k: v for k, v in ck.items() if k != "records"}]
                save_state(state_dir, st, model, memory, base_fp)
                since_save = 0
                _write_summary(run_dir, st, cfg, finished=not pending and st.n_batches == len(batches))
    return run_dir


def _choose_seq_dir(out: Path, alg: str, match: dict[str, Any], params: dict[str, Any]) -> Path:
    """The ``<out>/<ALG>/seq_<NNN>`` whose params match (as one-edit runs choose theirs), or a new one."""
    import fcntl

    root = Path(out) / alg
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        runs = sorted(p for p in root.glob("seq_*") if p.is_dir() and p.name[4:].isdigit())
        for run in runs:
            try:
                if json.loads((run / "params.json").read_text()).get("match") == match:
                    return run
            except (OSError, json.JSONDecodeError):
                continue
        nxt = max((int(p.name[4:]) for p in runs), default=-1) + 1
        run = root / f"seq_{nxt:03d}"
        run.mkdir()
        atomic_write_json(run / "params.json", params)
        return run


def _wild(model, tok, specs: Sequence[WildPrompts], values: list[dict[str, float]], cfg: SequentialConfig
          ) -> list[dict[str, list[str]]]:
    """Add the WILD-style values of each record (``specs`` and ``values`` in step) to ``values``;
    returns each record's continuations per prompt group."""
    out = run_wild(model, tok, [WildJob(s) for s in specs], max_new_tokens=cfg.wild_max_new_tokens,
                   records_per_batch=cfg.wild_records)
    for v, (m, _) in zip(values, out):
        v.update(record_values({"wild": m}))
    return [m["texts"] for m, _ in out]


def _checkpoint(model, tok, order, scorers, st: SequentialState, originals, cfg: SequentialConfig, ppl_lines, memory,
                wild: Sequence[WildPrompts] | None = None, scoring: Any = None) -> dict:
    """Score every record edited so far on the current model, and the new ones on the unedited weights
    (with ``wild``, each record's WILD-style prompts: free generation too)."""
    n = st.n_edits
    scoring = CounterFactScoring() if scoring is None else scoring
    t0 = time.perf_counter()
    edited = scoring.score(model, tok, scorers[:n], cfg.batch_size)
    t_eval = time.perf_counter() - t0
    texts, t_wild = None, None
    if wild is not None:
        t0 = time.perf_counter()
        texts = _wild(model, tok, wild[:n], edited, cfg)
        t_wild = time.perf_counter() - t0
    ppl = perplexity(model, tok, ppl_lines, cfg.ppl_protocol) if cfg.ppl else None
    if len(st.unedited) < n:
        current = _swap(model, originals)
        try:
            fresh = scoring.score(model, tok, scorers[len(st.unedited) : n], cfg.batch_size)
            if wild is not None:
                _wild(model, tok, wild[len(st.unedited) : n], fresh, cfg)
            st.unedited.extend(fresh)
        finally:
            _swap(model, current)
    edit_times = [b["edit_s"] for b in st.batches]
    refused_at = {i for b in st.batches if "refused" in b
                  for i in range(b["batch"] * cfg.batch_edits, b["batch"] * cfg.batch_edits + b["n"])}
    return {
        "n_edits": n,
        "n_batches": st.n_batches,
        "metrics": record_means(edited),
        "unedited_metrics": record_means(st.unedited[:n]),
        "wikitext_ppl": ppl,
        "unedited_wikitext_ppl": st.unedited_ppl,
        "norms": _norms(model, originals),
        "memory_keys": len(memory),
        "speed": {
            "edit_s_total": sum(edit_times),
            "edits_per_s": n / sum(edit_times) if sum(edit_times) else None,
            "edit_s_last_batch": edit_times[-1] if edit_times else None,
            "eval_s": t_eval,
            "eval_s_per_record": t_eval / max(1, n),
            **({"wild_s": t_wild, "wild_s_per_record": t_wild / max(1, n)} if t_wild is not None else {}),
        },
        "memory": _rss_mb(),
        "records": [{"case_id": c.case_id, "edited_at": i, **v, **({"refused": True} if i in refused_at else {}),
                     **({"wild_texts": texts[i]} if texts is not None else {})}
                    for i, (c, v) in enumerate(zip(order, edited))],
        **({"refused_edits": len(refused_at)} if refused_at else {}),  # requests the edit guard refused: never applied
    }


def _write_summary(run_dir: Path, st: SequentialState, cfg: SequentialConfig, *, finished: bool) -> None:
    atomic_write_json(run_dir / "summary.json", {
        "alg": cfg.alg, "T": cfg.total, "B": cfg.batch_edits, "finished": finished,
        "n_edits": st.n_edits, "checkpoints": sorted(st.checkpoints, key=lambda c: c["n_edits"]),
        "batches": st.batches,
    })
