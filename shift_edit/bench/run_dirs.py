"""Run folders of ``shift-edit bench``: the folder whose recorded protocol matches (or a new ``run_<NNN>``, chosen
under a file lock so that shards agree), the per-record case files, and how records are grouped into shards
(``RANK`` / ``WORLD_SIZE``)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ShiftEditError
from ..files.io import atomic_write_json, provenance
from .bench_config import NO_EDIT
from .counterfact import case_file_stem


def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def choose_run_dir(out: Path, alg: str, match: dict[str, Any], params: dict[str, Any]) -> Path:
    """The run directory whose params match ``match``, or a new ``run_<NNN>`` (under a lock)."""
    root = Path(out) / alg
    fh = _lock(root / ".lock")
    try:
        runs = sorted(p for p in root.glob("run_*") if p.is_dir() and p.name[4:].isdigit())
        for run in runs:
            try:
                existing = json.loads((run / "params.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if existing.get("match") == match:
                return run
        nxt = max((int(p.name[4:]) for p in runs), default=-1) + 1
        run = root / f"run_{nxt:03d}"
        run.mkdir()
        atomic_write_json(run / "params.json", params)
        return run
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def case_path(run_dir: Path, case_id: int | str) -> Path:
    return Path(run_dir) / f"case_{case_file_stem(case_id)}.json"


def finished(run_dir: Path, case_id: int | str) -> bool:
    p = case_path(run_dir, case_id)
    if not p.is_file():
        return False
    try:
        json.loads(p.read_text())
        return True
    except (OSError, json.JSONDecodeError):
        return False


def batches_per_group(cfg) -> int:
    """Batches per group: groups of batches whose generations share one decoding batch; a group is always
    the same records (fixed by position), so resumed and sharded runs generate exactly what a whole run
    does (with --gen-every K, a group spans K times as many records, about gen_records of them generating; the
    WILD-style generations likewise batch wild_records records, and a group spans the larger of the two)."""
    spans = ([] if cfg.skip_generation else [cfg.gen_records * max(1, cfg.gen_every)]) + \
        ([] if cfg.skip_wild else [cfg.wild_records])  # the WILD-style generations batch wild_records records
    return max(1, max(spans, default=1) // cfg.num_edits)


def n_shares(n_cases: int, cfg) -> int:
    """Into how many shards ``n_cases`` records can be split: the number of groups (the unit a shard takes)."""
    batches = -(-n_cases // cfg.num_edits)
    return -(-batches // batches_per_group(cfg))


def shard_env() -> tuple[int, int]:
    """(rank, world_size) from ``RANK``/``WORLD_SIZE`` (set by accelerate launch / torchrun)."""
    try:
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ShiftEditError("RANK / WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ShiftEditError(f"bad RANK={rank} / WORLD_SIZE={world}")
    return rank, world


def run_selection(run_dir: Path) -> list[Path]:
    """The finished case files of a run dir (temp files of killed runs are ignored)."""
    return sorted(p for p in Path(run_dir).glob("case_*.json") if not p.name.startswith("."))


def start_run(cfg, model: nn.Module, rank: int | None, world_size: int | None) -> tuple[int, int, dict[str, Any]]:
    """What every benchmark run does first: refuse an algorithm without hparams, take the shard from
    ``RANK``/``WORLD_SIZE`` unless given, seed torch with ``cfg.seed``; returns ``(rank, world_size, provenance)``."""
    if cfg.alg != NO_EDIT and cfg.hparams is None:
        raise ShiftEditError(f"--alg {cfg.alg} needs hparams")
    if rank is None or world_size is None:
        rank, world_size = shard_env()
    torch.manual_seed(cfg.seed)
    return rank, world_size, provenance(model)
