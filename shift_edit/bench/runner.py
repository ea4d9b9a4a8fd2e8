"""The CounterFact runner: one edit at a time, exact undo, resumable run directories, sharding.

Layout: ``<out>/<ALG>/run_<NNN>/params.json`` and one ``case_<id>.json`` per record, all
written atomically (a killed run leaves at most a ``.case_*.tmp`` file, which is ignored).
A run directory is reused when its ``params.json`` has the same *match key* (everything that
determines the numbers: protocol, model fingerprint, algorithm + hparams, seed, data file
sha256); the record selection (``--limit/--start/--case-ids``) is not part of it, so running
more records of the same configuration fills the same directory, and finished cases are skipped.

Sharding: with ``world_size`` > 1 (``RANK``/``WORLD_SIZE`` as set by ``accelerate launch`` or
``torchrun``) process ``rank`` takes the ``rank``-th of W contiguous shares of the selected
records (so the every-K-th perplexity measurements are spread over the processes too);
all processes pick the same run directory (under a file lock) and write into it, so the
merged result is simply the directory's case files.
"""

from __future__ import annotations

import logging
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.common import adapter_for
from ..compat import easyedit_metrics as ee  # (the facade imports this package: its names are read at call time)
from ..core.editing import edit
from ..core.errors import EditRefusedError
from ..files.io import atomic_write_json
from .bench_config import NO_EDIT, BenchConfig
from .claims import claimed
from .counterfact import CounterFactCase
from .generation import GenerationGroup, generate_topk_groups, ngram_entropy
from .metrics import CaseScorer, kl_divergence, metrics_from_scores
from .prepare import Prepared, planned_block, prepare_record, prepare_records
from .run_dirs import batches_per_group, case_path, choose_run_dir, finished, start_run
from .wikitext import perplexity, read_wikitext_lines
from .wild import WildJob, run_wild, wild_prompts

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What a run learns once and keeps: whether re-running only the edited blocks reproduces a
    full forward pass on this model (``None`` until the first edit that can use it checks it)."""

    resume_exact: bool | None = None


def _same(a: dict[str, list], b: dict[str, list]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-4) for k in a for x, y in zip(a[k], b[k]))


def _edited_logits(model, prep: Prepared, result, cfg, state: RunState) -> tuple[dict[str, list], int]:
    """Logits of the edited model at the record's planned positions, and the first block re-run.

    Blocks before the planned (first edited) block are skipped: their recorded output feeds it
    (:mod:`shift_edit.model.resume`). The first time in a run this is checked against a full pass and
    switched off, with a warning, if they differ; an edit that changed an earlier block (or
    anything outside the blocks) gets full passes.
    """
    resume = prep.resume_after(result.deltas) if state.resume_exact is not False else None
    if resume is None:
        return prep.scorer.logits(model, batch_size=cfg.batch_size), 0
    logits = prep.scorer.logits(model, batch_size=cfg.batch_size, resume=resume)
    if state.resume_exact is None:
        full = prep.scorer.logits(model, batch_size=cfg.batch_size)
        state.resume_exact = _same(logits, full)
        if not state.resume_exact:
            log.warning("re-running only the edited blocks does not reproduce a full forward pass on this "
                        "model; using full passes for this run")
            return full, 0
    return logits, next(iter(resume.values())).block


def _measure(model, tok, prep: Prepared, logits, cfg: BenchConfig, ppl_lines) -> dict[str, Any]:
    """Every metric of one record on the model as it is now."""
    m = metrics_from_scores(prep.scores if logits is None else prep.scorer.scores(logits))
    if cfg.neighborhood_kl and prep.scorer.n_neighborhood:
        if prep.pre_logp is None:  # the unedited row: edited == unedited, KL is 0 by definition
            kl = torch.zeros(prep.scorer.n_neighborhood)
        else:
            kl = kl_divergence(prep.pre_logp, prep.scorer.neighborhood_logprobs(logits))
        m["neighborhood_kl"] = {"mean": float(kl.mean()), "per_prompt": kl.tolist()}
    port = prep.case.raw.get("portability") if cfg.portability else None
    if isinstance(port, dict) and isinstance(port.get("New Question"), str) and isinstance(port.get("New Answer"), str):
        acc = ee.token_accuracy(model, tok, port["New Question"], port["New Answer"])
        m["easyedit_portability"] = {"acc": sum(acc) / len(acc) if acc else None}
    if cfg.ppl_every and ppl_lines is not None and prep.position % cfg.ppl_every == 0:
        m["perplexity"] = {"value": perplexity(model, tok, ppl_lines, cfg.ppl_protocol), **cfg.ppl_protocol.to_dict()}
    return m


# length: edit, measure every record of the batch, undo: the order of these steps (and the guard's refusal recorded
#   per case) is the protocol, kept readable top to bottom
def evaluate_batch(
    model: nn.Module, tok, cases: Sequence[CounterFactCase], cfg: BenchConfig, *, positions: Sequence[int],
    ppl_lines: Sequence[str] | None, state: RunState | None = None,
    deferred: list[tuple[dict, GenerationGroup | WildJob]] | None = None,
    prepared: Sequence[Prepared] | None = None, prepare_s: float | None = None,
) -> list[dict[str, Any]]:
    """Apply the requests of ``cases`` at once (none for NONE), measure every record, undo.

    Generation (n-gram entropy, and the WILD-style family) runs after the undo with the edit added
    to the generating rows by hooks; with ``deferred`` (a list) it is not run but queued there, for
    :func:`fill_generations` to batch several records' generations into one decoding batch.

    Before the edit, one pass of the unedited model per record records the input of the edited
    block and the neighborhood distributions (the KL reference); after the edit only the blocks
    from the edited one on are re-run. ``state`` carries the run's one-off check of that shortcut.
    ``prepared`` (with its time per record, ``prepare_s``): that state, computed by :func:`prepare_records`
    with other records' (the default: each record alone, the reference path).
    """
    state = RunState() if state is None else state
    t0 = time.perf_counter()
    edited = cfg.alg != NO_EDIT
    adapter = adapter_for(model, cfg.hparams) if edited else None
    planned = planned_block(adapter, cfg.hparams) if edited else None
    if prepared is not None:
        preps, t_prepare = list(prepared), (prepare_s or 0.0) * len(cases)
    else:
        preps = [prepare_record(model, tok, c, p, cfg, adapter, planned, cfg.neighborhood_kl and edited) if edited
                 else Prepared(c, p, CaseScorer(tok, c), {}, None) for c, p in zip(cases, positions)]
        t_prepare = time.perf_counter() - t0
    result, t_edit, refused = None, 0.0, None
    records: list[dict[str, Any]] = []
    gen_requests: list[tuple[int, GenerationGroup | WildJob]] = []
    try:
        if edited:
            te = time.perf_counter()
            try:
                result = edit(model, tok, [c.request for c in cases], cfg.hparams)
            except EditRefusedError as err:  # recorded per case; the records are measured unedited
                refused = str(err)
                log.warning("cases %s: the edit guard refused the edit (not applied): %s",
                            [c.case_id for c in cases], err)
            t_edit = time.perf_counter() - te
        for i, prep in enumerate(preps):
            ts = time.perf_counter()
            if result is not None and result.deltas:
                logits, first = _edited_logits(model, prep, result, cfg, state)
            elif prep.scores is not None:  # the unedited row, scored with other records'
                logits, first = None, 0
            elif prepared is not None and state.resume_exact and (resume := prep.resume_unedited()) is not None:
                # left unedited (skipped / refused) after packed passes: they go on from the recorded block
                logits = prep.scorer.logits(model, batch_size=cfg.batch_size, resume=resume)
                first = next(iter(resume.values())).block
            else:
                logits, first = prep.scorer.logits(model, batch_size=cfg.batch_size), 0
            m = _measure(model, tok, prep, logits, cfg, ppl_lines)
            edit_info: dict[str, Any] = {"applied": False}
            if refused is not None:
                edit_info["refused"] = refused
            if result is not None:
                edit_info = {"applied": bool(result.deltas), "skipped": bool(result.skipped[i]),
                             "deltas": list(result.summary(outcome=False)), "rerun_from_block": first,
                             # per-request details of the algorithm (ROME/MEMIT: optimisation steps, losses)
                             "info": result.info[i] if i < len(result.info) else {}}
                if len(cases) > 1:
                    edit_info["batch"] = [c.case_id for c in cases]
            if generates(cfg, prep.position) and prep.case.generation_prompts:
                gen_requests.append((len(records), GenerationGroup(
                    list(prep.case.generation_prompts), cfg.seed * 1_000_003 + _stable_int(prep.case.case_id),
                    list(result.deltas) if result is not None else [])))
            if not cfg.skip_wild:
                gen_requests.append((len(records), WildJob(wild_prompts(prep.case, neighborhood=cfg.wild_neighborhood),
                                                           list(result.deltas) if result is not None else [])))
            records.append({
                "case_id": prep.case.case_id,
                "position": prep.position,
                "source_format": prep.case.source_format,
                "request": prep.case.request.to_dict(),
                "neighborhood_true": prep.case.neighborhood_true,
                "edit": edit_info,
                "metrics": m,
                "time_s": {"edit": t_edit, "prepare": t_prepare / len(cases), "measure": time.perf_counter() - ts},
            })
    finally:
        if result is not None:
            result.undo()
    pending = [(records[i], g) for i, g in gen_requests]
    if deferred is None:
        fill_generations(model, tok, pending, cfg)
    else:
        deferred.extend(pending)
    return records


def generates(cfg: BenchConfig, position: int) -> bool:
    """Whether the record at run position ``position`` gets generations (every ``gen_every``-th)."""
    return not cfg.skip_generation and position % max(1, cfg.gen_every) == 0


def fill_generations(model: nn.Module, tok, pending: Sequence[tuple[dict, GenerationGroup | WildJob]],
                     cfg: BenchConfig) -> None:
    """Generate for several records in one decoding batch (their edits added per row) and store
    the n-gram entropy and texts (``generation``) and the WILD-style metrics and texts (``wild``)
    in each record's metrics."""
    wild = [(rec, j) for rec, j in pending if isinstance(j, WildJob)]
    for (rec, _), (m, dt) in zip(wild, run_wild(model, tok, [j for _, j in wild],
                                                max_new_tokens=cfg.wild_max_new_tokens,
                                                records_per_batch=cfg.wild_records)):
        rec["metrics"]["wild"] = m
        rec["time_s"]["wild"] = dt
    pending = [(rec, g) for rec, g in pending if isinstance(g, GenerationGroup)]
    k = max(1, cfg.gen_records)
    for start in range(0, len(pending), k):  # at most gen_records records per decoding batch (KV-cache memory)
        chunk = pending[start : start + k]
        t0 = time.perf_counter()
        texts = generate_topk_groups(model, tok, [g for _, g in chunk], max_length=cfg.gen_max_length,
                                     top_k=cfg.gen_top_k)
        dt = (time.perf_counter() - t0) / len(chunk)
        for (rec, _), t in zip(chunk, texts):
            rec["metrics"]["generation"] = {"ngram_entropy": ngram_entropy(t), "texts": t}
            rec["time_s"]["generation"] = dt


def evaluate_case(
    model: nn.Module, tok, case: CounterFactCase, cfg: BenchConfig, *, position: int,
    ppl_lines: Sequence[str] | None, state: RunState | None = None,
) -> dict[str, Any]:
    """Edit one record (unless ``cfg.alg`` is NONE), measure, undo; returns the case record."""
    return evaluate_batch(model, tok, [case], cfg, positions=[position], ppl_lines=ppl_lines, state=state)[0]


def _stable_int(x: int | str) -> int:
    if isinstance(x, int):
        return x
    return zlib.crc32(str(x).encode())


# length: the run's one loop over groups of batches (claim a group, evaluate, generate, write each case file) with
#   the shard and resume bookkeeping it needs in one place
def run_bench(
    model: nn.Module,
    tok,
    cases: Sequence[CounterFactCase],
    cfg: BenchConfig,
    out: str | Path,
    *,
    data_info: dict[str, Any],
    model_name: str,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Run the benchmark over ``cases`` into ``<out>/<ALG>/run_<NNN>/``; returns the run dir.

    Cases already finished in the chosen run dir are skipped (resume). ``rank/world_size``
    default to :func:`shard_env`.
    """
    rank, world_size, prov = start_run(cfg, model, rank, world_size)
    match = {
        "alg": cfg.alg,
        "hparams": cfg.hparams.to_dict() if cfg.hparams is not None else None,
        "model": {"name": model_name, "fingerprint": prov["model"]["fingerprint"], "dtype": prov["model"]["dtype"]},
        "seed": cfg.seed,
        "protocol": cfg.protocol(),
        "data_sha256": data_info.get("sha256"),
    }
    params = {
        "match": match,
        "data": data_info,
        "provenance": prov,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # every input checked before a run folder exists: no empty run dir left by a late error
    if cfg.hparams is not None:
        adapter_for(model, cfg.hparams)  # layers in range, module templates resolve
    ppl_lines = None
    if cfg.ppl_every:
        ppl_lines = read_wikitext_lines(cfg.wikitext)
    run_dir = choose_run_dir(Path(out), cfg.alg, match, params)
    n = cfg.num_edits
    batches = [list(enumerate(cases))[b : b + n] for b in range(0, len(cases), n)]
    per_group = batches_per_group(cfg)
    groups = [batches[g : g + per_group] for g in range(0, len(batches), per_group)]
    # contiguous shares: records every K-th position (perplexity) spread over the shards too
    mine = groups[rank * len(groups) // world_size : (rank + 1) * len(groups) // world_size]
    first_mine = rank * len(groups) // world_size
    todo_at = [first_mine + g for g, grp in enumerate(mine)
               if not all(finished(run_dir, c.case_id) for batch in grp for _, c in batch)]
    todo = [groups[g] for g in todo_at]
    n_todo = sum(len(b) for grp in todo for b in grp)
    n_mine = sum(len(b) for grp in mine for b in grp)
    log.info("run dir %s: %d of %d cases to do (rank %d/%d)", run_dir, n_todo, n_mine, rank, world_size)
    if n_todo < n_mine:  # a resumed run: say so instead of an empty progress bar
        msg = f"{run_dir}: {n_mine - n_todo} of {n_mine} cases already done, {n_todo} to do"
        tqdm.write(msg, file=sys.stderr) if progress else log.info(msg)
    model.eval()
    bar = tqdm(total=n_todo, desc=f"{cfg.alg} rank {rank}" if world_size > 1 else cfg.alg, unit="case",
               disable=not progress or n_todo == 0, position=rank if world_size > 1 else None)
    state = RunState()
    # windows of groups whose unedited passes share batches, fixed by position like the groups: a resumed or
    # sharded run packs a window's records as a whole run does (the finished or other shards' ones included)
    per_window = max(1, cfg.score_records // (per_group * n))
    with bar:
        for w in sorted({g - g % per_window for g in todo_at}):
            ready, prepare_s = _prepare_window(model, tok, groups[w : w + per_window], cfg)
            for grp in [groups[g] for g in todo_at if w <= g < w + per_window]:
                ids = [c.case_id for batch in grp for _, c in batch]
                with claimed(run_dir, ids) as mine:  # another worker on the same run dir may have it
                    if not mine or all(finished(run_dir, cid) for cid in ids):
                        bar.update(len(ids))
                        continue
                    deferred: list[tuple[dict, GenerationGroup | WildJob]] = []
                    recs = [
                        rec
                        for batch in grp
                        for rec in evaluate_batch(
                            model,
                            tok,
                            [c for _, c in batch],
                            cfg,
                            positions=[i for i, _ in batch],
                            ppl_lines=ppl_lines,
                            state=state,
                            deferred=deferred,
                            prepared=None if ready is None else [ready[i] for i, _ in batch],
                            prepare_s=prepare_s,
                        )
                    ]
                    fill_generations(model, tok, deferred, cfg)
                    for rec in recs:
                        if not finished(run_dir, rec["case_id"]):  # a re-run group leaves finished files as they are
                            atomic_write_json(case_path(run_dir, rec["case_id"]), rec)
                    bar.update(len(recs))
    return run_dir


def _prepare_window(model, tok, groups, cfg: BenchConfig) -> tuple[dict[int, Prepared] | None, float]:
    """The unedited passes of every record of ``groups`` in shared batches (:func:`prepare_records`), by run
    position, and their time per record; None with ``cfg.score_records`` 1 (each record alone, in
    :func:`evaluate_batch`)."""
    if cfg.score_records <= 1:
        return None, 0.0
    todo = [(i, c) for grp in groups for batch in grp for i, c in batch]
    t0 = time.perf_counter()
    preps = prepare_records(model, tok, [c for _, c in todo], [i for i, _ in todo], cfg)
    return {p.position: p for p in preps}, (time.perf_counter() - t0) / len(todo)


