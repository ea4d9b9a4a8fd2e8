"""``shift-edit bench`` on zsRE and KnowEdit: one edit (or ``num_edits`` records' edits) at a time, measured
in the data set's own metric families (:mod:`.fact_metrics`), undone bit-exactly before the next.

The run directory rules are the CounterFact runner's (:func:`.runner.choose_run_dir`: the same match key of
protocol, model fingerprint, algorithm + hparams, seed and data sha256; finished cases skipped; atomic case
files; ``RANK``/``WORLD_SIZE`` shares). A result file holds ``dataset``, the record, the edit and ``metrics``
keyed by family (``zsre_token_acc`` + ``zsre_top1``, or ``easyedit``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..algorithms.common import adapter_for
from ..core.editing import edit
from ..core.errors import EditRefusedError
from ..core.hparams import HyperParams
from ..files.io import atomic_write_json
from .bench_config import NO_EDIT
from .claims import claimed
from .fact_metrics import easyedit_post, easyedit_pre, families_for, zsre_pairs, zsre_scores
from .facts import FactCase
from .run_dirs import case_path, choose_run_dir, finished, start_run

log = logging.getLogger(__name__)

FACT_PROTOCOL_VERSION = 1


@dataclass
class FactBenchConfig:
    """What a zsRE / KnowEdit run computes (all of it goes into ``params.json``).

    ``dataset``: the data set's name (``zsre``, ``knowedit-recent``, ... or the file's stem); ``fmt``: ``zsre`` or
    ``knowedit``; ``fluency``: EasyEdit's Fluency (generation; knowedit only).
    """

    alg: str
    hparams: HyperParams | None
    dataset: str
    fmt: str
    seed: int = 0
    fluency: bool = True
    batch_size: int = 64
    num_edits: int = 1

    def protocol(self) -> dict[str, Any]:
        return {
            "version": FACT_PROTOCOL_VERSION,
            "dataset": self.dataset,
            "format": self.fmt,
            "metric_families": families_for(self.fmt, fluency=self.fluency and self.fmt == "knowedit"),
            "edit_mode": "one edit at a time, undone bit-exactly before the next" if self.num_edits == 1 else
            f"{self.num_edits} consecutive records' requests applied at once, each record evaluated, then undone",
            "num_edits": self.num_edits,
        }


def _measure(model: nn.Module, tok, cases: Sequence[FactCase], cfg: FactBenchConfig, pre: list) -> list[dict[str, Any]]:
    """Every record's metrics on the model as it is now (``pre``: EasyEdit's unedited measurements)."""
    if cfg.fmt == "zsre":
        return zsre_scores(model, tok, [zsre_pairs(tok, c) for c in cases], batch_size=cfg.batch_size)
    return [{"easyedit": easyedit_post(model, tok, c, p, fluency=cfg.fluency, seed=cfg.seed * 1_000_003 + c.case_id)}
            for c, p in zip(cases, pre)]


def evaluate_fact_batch(model: nn.Module, tok, cases: Sequence[FactCase], cfg: FactBenchConfig,
                        positions: Sequence[int]) -> list[dict[str, Any]]:
    """Apply the requests of ``cases`` at once (none for NONE), measure every record, undo."""
    t0 = time.perf_counter()
    pre = [easyedit_pre(model, tok, c) for c in cases] if cfg.fmt == "knowedit" else [None] * len(cases)
    t_pre = time.perf_counter() - t0
    result, refused, t_edit = None, None, 0.0
    try:
        if cfg.alg != NO_EDIT:
            te = time.perf_counter()
            try:
                result = edit(model, tok, [c.request for c in cases], cfg.hparams)
            except EditRefusedError as err:
                refused = str(err)
                log.warning("cases %s: the edit guard refused the edit (not applied): %s", [c.case_id for c in cases],
                            err)
            t_edit = time.perf_counter() - te
        tm = time.perf_counter()
        metrics = _measure(model, tok, cases, cfg, pre)
        t_measure = (time.perf_counter() - tm) / len(cases)
    finally:
        if result is not None:
            result.undo()
    out = []
    for i, (case, m, pos) in enumerate(zip(cases, metrics, positions)):
        info: dict[str, Any] = {"applied": False, **({"refused": refused} if refused is not None else {})}
        if result is not None:
            info = {"applied": bool(result.deltas), "skipped": bool(result.skipped[i]),
                    "deltas": list(result.summary(outcome=False)),
                    "info": result.info[i] if i < len(result.info) else {}}
            if len(cases) > 1:
                info["batch"] = [c.case_id for c in cases]
        out.append({**case.to_dict(), "position": pos, "dataset": cfg.dataset, "edit": info, "metrics": m,
                    "time_s": {"edit": t_edit, "prepare": t_pre / len(cases), "measure": t_measure}})
    return out


def run_fact_bench(model: nn.Module, tok, cases: Sequence[FactCase], cfg: FactBenchConfig, out: str | Path, *,
                   data_info: dict[str, Any], model_name: str, rank: int | None = None,
                   world_size: int | None = None, progress: bool = True) -> Path:
    """Run the benchmark over zsRE / KnowEdit ``cases`` into ``<out>/<ALG>/run_<NNN>/``; returns the run dir."""
    rank, world_size, prov = start_run(cfg, model, rank, world_size)
    match = {"alg": cfg.alg, "hparams": cfg.hparams.to_dict() if cfg.hparams is not None else None,
             "model": {"name": model_name, "fingerprint": prov["model"]["fingerprint"],
                       "dtype": prov["model"]["dtype"]},
             "seed": cfg.seed, "protocol": cfg.protocol(), "data_sha256": data_info.get("sha256")}
    params = {"match": match, "data": data_info, "provenance": prov,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if cfg.hparams is not None:
        adapter_for(model, cfg.hparams)  # checked before a run folder exists
    run_dir = choose_run_dir(Path(out), cfg.alg, match, params)
    n = cfg.num_edits
    batches = [list(enumerate(cases))[b : b + n] for b in range(0, len(cases), n)]
    mine = batches[rank * len(batches) // world_size : (rank + 1) * len(batches) // world_size]
    todo = [b for b in mine if not all(finished(run_dir, c.case_id) for _, c in b)]
    model.eval()
    with tqdm(total=sum(len(b) for b in todo), desc=f"{cfg.alg} {cfg.dataset}", unit="case",
              disable=not progress or not todo) as bar:
        for batch in todo:
            ids = [c.case_id for _, c in batch]
            with claimed(run_dir, ids) as got:
                if got and not all(finished(run_dir, cid) for cid in ids):
                    for rec in evaluate_fact_batch(model, tok, [c for _, c in batch], cfg, [i for i, _ in batch]):
                        if not finished(run_dir, rec["case_id"]):
                            atomic_write_json(case_path(run_dir, rec["case_id"]), rec)
            bar.update(len(batch))
    return run_dir
