"""ROME, MEMIT and AlphaEdit here against EasyEdit's own implementation of the same method (issue 33, target 5).

Both implementations edit the same model object with the same requests, hparams values, statistics and context
templates, on the same CPU and thread count; records are interleaved (which implementation goes first alternates), so
machine load falls on both alike. Per method the script reports:

- the median wall time of one edit (EasyEdit: ``apply_<method>_to_model``; here: ``shift_edit.edit``) and the ratio;
- the cosine between the two ΔW (all edited matrices flattened together) and their norm ratio;
- the metrics after each implementation's edit (ROME's probability comparisons: ES on the prompt, PS on the
  paraphrases, NS on the neighbourhood prompts; and strict top-1 of the new object on the prompt and paraphrases):
  the number of per-prompt decisions that differ, and the largest |difference| of a mean target NLL.

What is shared, so that ΔW can be compared: EasyEdit's statistics are ours, written in its cache format
(``<stats_dir>/<model>/<dataset>_stats/<module>_<dtype>_mom2_<n>.npz``, count 1 so its ``moment()`` returns our C
exactly); its context-template caches are set to our templates (EasyEdit samples its own at random: ROME from
``context_template_length_params``, MEMIT and AlphaEdit from a fixed ``[(10, 5)]``); AlphaEdit's null-space
projector is EasyEdit's ``get_project`` over that C, saved where ``P_loc`` points. One-off costs (statistics,
templates, projector, EasyEdit's inverse-covariance cache) are paid by an untimed warm-up edit of each.

EasyEdit's ``easyeditor/__init__.py`` imports every editor and its dependencies; this script loads only the three
methods' modules from a checkout (``--easyedit``: the folder that holds ``easyeditor/``, e.g. ``git clone
https://github.com/zjunlp/EasyEdit``). Nothing of EasyEdit is part of this repository.

    SHIFT_EDIT_DATA=../shared/data PYTHONPATH=. python eval/bench_vs_easyedit.py --easyedit /path/to/EasyEdit \\
        --methods ROME,MEMIT,AlphaEdit --n 5 --threads 1 --out eval/reports/speed/vs_easyedit.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

import shift_edit as se
from shift_edit.algorithms.locate.contexts import template_groups, templates_for
from shift_edit.bench.counterfact import CounterFactCase, parse_case
from shift_edit.bench.metrics import metrics_from_scores, score_case
from shift_edit.core.deltas import put_back
from shift_edit.core.requests import EditRequest
from shift_edit.files.data_files import require_data
from shift_edit.files.io import atomic_write_json, provenance
from shift_edit.model.covariance import layer_stats

# Each method: EasyEdit's package, main module, apply function and hparams class.
EASYEDIT = {
    "ROME": ("rome", "rome_main", "apply_rome_to_model", "ROMEHyperParams"),
    "MEMIT": ("memit", "memit_main", "apply_memit_to_model", "MEMITHyperParams"),
    "AlphaEdit": ("alphaedit", "AlphaEdit_main", "apply_AlphaEdit_to_model", "AlphaEditHyperParams"),
}
# Llama-architecture module names in EasyEdit's hparams (its llama-7b.yaml files use the same).
LLAMA_MODULES = dict(
    rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
    mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
    ln_f_module="model.norm", lm_head_module="lm_head",
)


def load_easyedit(root: Path) -> dict[str, types.ModuleType]:
    """Import the three methods' main modules from an EasyEdit checkout without running the package
    ``__init__`` files that import every other editor."""
    for name, sub in (("easyeditor", "easyeditor"), ("easyeditor.models", "easyeditor/models"),
                      ("easyeditor.util", "easyeditor/util")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / sub)]
        sys.modules[name] = pkg
    return {m: importlib.import_module(f"easyeditor.models.{pkg}.{main}") for m, (pkg, main, _, _) in EASYEDIT.items()}


def source_digest(root: Path) -> str:
    """sha256 over the EasyEdit source files this script runs (its version, whatever the checkout's git state)."""
    h = hashlib.sha256()
    for sub in ("models/rome", "models/memit", "models/alphaedit", "util"):
        for f in sorted((root / "easyeditor" / sub).glob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def write_stats(stats_dir: Path, model, hp, stats: dict[int, Any], dataset: str) -> int:
    """Our C of each layer as EasyEdit's cached ``layer_stats`` file; returns the sample-size tag used."""
    n = int(hp.mom2_n_tokens)
    folder = stats_dir / model.config._name_or_path.rsplit("/")[-1] / f"{dataset}_stats"
    folder.mkdir(parents=True, exist_ok=True)
    for layer, st in stats.items():
        name = LLAMA_MODULES["rewrite_module_tmp"].format(layer)
        np.savez(folder / f"{name}_{hp.mom2_dtype}_mom2_{n}.npz", **{
            "mom2.constructor": np.array("SecondMoment()"), "mom2.count": np.array(1),
            "mom2.mom2": st.mom2.float().numpy(), "sample_size": np.array(n)})
    return n


def easyedit_hparams(method: str, mod: types.ModuleType, model, hp, stats_dir: Path, n_samples: int,
                     p_loc: Path) -> Any:
    """EasyEdit's hparams object with our values."""
    fields: dict[str, Any] = dict(
        layers=list(hp.layers), fact_token=hp.fact_token, v_num_grad_steps=hp.v_num_grad_steps, v_lr=hp.v_lr,
        v_loss_layer=model.config.num_hidden_layers - 1, v_weight_decay=hp.v_weight_decay,
        clamp_norm_factor=hp.clamp_norm_factor,
        kl_factor=hp.kl_factor, mom2_adjustment=getattr(hp, "mom2_adjustment", False), mom2_dataset="wikipedia",
        mom2_n_samples=n_samples, mom2_dtype=hp.mom2_dtype, alg_name=method, device="cpu",
        # EasyEdit's AlphaEdit picks the weight orientation by the model's name; SmolLM2 is a Llama.
        model_name="llama-architecture: smollm2-135m", stats_dir=str(stats_dir), **LLAMA_MODULES)
    # EasyEdit reads the decoding matrix as the parameter "<lm_head_module>.weight"; a tied model (SmolLM2) lists it
    # under the embedding only.
    if "lm_head.weight" not in dict(model.named_parameters()):
        fields["lm_head_module"] = "model.embed_tokens"
    if method == "ROME":
        fields["context_template_length_params"] = [list(p) for p in hp.context_template_length_params]
    else:
        fields.update(layer_selection="all", mom2_update_weight=getattr(hp, "mom2_update_weight", 1.0))
    if method == "AlphaEdit":
        fields.update(nullspace_threshold=hp.nullspace_threshold, L2=hp.L2, P_loc=str(p_loc))
    return getattr(mod, EASYEDIT[method][3])(**fields)


def easyedit_request(req: EditRequest) -> dict[str, Any]:
    """EasyEdit's request dict; its methods add the leading space to the target themselves."""
    return {"prompt": req.prompt, "subject": req.subject, "target_new": req.target_new[1:]
            if req.target_new.startswith(" ") else req.target_new, "target_true": req.target_true}


def set_templates(method: str, mod: types.ModuleType, templates: list[str], groups: list[int]) -> None:
    """Point EasyEdit's context-template cache at our templates (ROME: flat; MEMIT/AlphaEdit: one list per type)."""
    if method == "ROME":
        mod.CONTEXT_TEMPLATES_CACHE = list(templates)
        return
    out, i = [], 0
    for g in groups:
        out.append(list(templates[i:i + g]))
        i += g
    mod.CONTEXT_TEMPLATES_CACHE = out


def snapshot(model, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: model.get_parameter(n).detach().clone() for n in names}


def measure(model, tok, case: CounterFactCase) -> dict[str, Any]:
    """The benchmark's per-prompt numbers of the case (:func:`score_case`): each prompt's mean target NLLs (new,
    true) and its decisions, the ROME comparison (neighbourhood: the reverse) and strict top-1."""
    m = metrics_from_scores(score_case(model, tok, case))
    out: dict[str, Any] = {"nll": [], "decisions": []}
    for group, pairs in m["nll"].items():
        for pair, top1 in zip(pairs, m["top1_correct"][group]):
            a, b = pair["target_new"], pair["target_true"]
            out["nll"] += [a, b]
            out["decisions"] += [(group, b < a if group == "neighborhood" else a < b), (group + "_top1", top1)]
    return out


def summary_of(rows: list[dict]) -> dict[str, float]:
    """ES/PS/NS and strict top-1 (efficacy, paraphrase, neighbourhood) in percent over the records."""
    acc: dict[str, list[bool]] = {}
    for r in rows:
        for key, ok in r["decisions"]:
            acc.setdefault(key, []).append(ok)
    return {k: 100.0 * sum(v) / len(v) for k, v in acc.items()}


def prepare(method: str, mod: types.ModuleType, model, tok, model_name: str, stats_dir: Path):
    """Our hparams (skip check and z* cache off) and EasyEdit's, with our statistics, templates and (AlphaEdit) its
    projector from our statistics in place."""
    hp = se.load_hparams(f"hparams/{method}/{model_name}.yaml").replace(skip_if_predicted=False)
    if hasattr(hp, "zstar_cache"):
        hp = hp.replace(zstar_cache=False)
    stats = layer_stats(model, tok, hp.layers, corpus=hp.mom2_corpus, n_tokens=hp.mom2_n_tokens,
                        max_length=hp.mom2_max_length, dtype=hp.mom2_dtype, progress=False)
    n_samples = write_stats(stats_dir, model, hp, stats, "wikipedia")
    p_loc = stats_dir / f"P_{method}.pt"
    ee_hp = easyedit_hparams(method, mod, model, hp, stats_dir, n_samples, p_loc)
    set_templates(method, mod, templates_for(model, tok, hp), template_groups(hp.context_template_length_params))
    if method == "AlphaEdit":
        with contextlib.redirect_stdout(io.StringIO()):
            torch.save(torch.stack([mod.get_project(model, tok, layer, ee_hp) for layer in hp.layers]), p_loc)
    return hp, ee_hp


def compare(method: str, mod: types.ModuleType, model, tok, records: list[dict], hp, ee_hp) -> dict[str, Any]:
    """Both implementations on every record (the first untimed), interleaved; times, ΔW agreement and metrics."""
    names = [LLAMA_MODULES["rewrite_module_tmp"].format(layer) + ".weight" for layer in hp.layers]
    orig = snapshot(model, names)
    apply_fn = getattr(mod, EASYEDIT[method][2])

    def ours(req: EditRequest) -> None:
        se.edit(model, tok, req, hp)

    def theirs(req: EditRequest) -> None:
        kwargs = {"reset_cache": True} if method == "AlphaEdit" else {}
        with contextlib.redirect_stdout(io.StringIO()):  # EasyEdit prints every step
            apply_fn(model, tok, [easyedit_request(req)], ee_hp, copy=False, return_orig_weights=False, **kwargs)

    rows: dict[str, list[dict]] = {"shift_edit": [], "easyedit": []}
    cosines, norm_ratios = [], []
    for i, rec in enumerate(records):
        case = parse_case(rec, i)
        req = case.request
        order = [("shift_edit", ours), ("easyedit", theirs)]
        if i % 2:
            order.reverse()
        deltas = {}
        for label, fn in order:
            t0 = time.perf_counter()
            fn(req)
            dt = time.perf_counter() - t0
            deltas[label] = torch.cat([(model.get_parameter(n).detach() - orig[n]).flatten() for n in names])
            row = {"case_id": case.case_id, "time_s": dt, **measure(model, tok, case)}
            put_back((model.get_parameter(n), w) for n, w in orig.items())
            if i > 0:
                rows[label].append(row)
        if i > 0:
            a, b = deltas["shift_edit"].double(), deltas["easyedit"].double()
            cosines.append(float(a @ b / (a.norm() * b.norm())))
            norm_ratios.append(float(a.norm() / b.norm()))
    pairs = list(zip(rows["shift_edit"], rows["easyedit"]))
    t_ours = statistics.median(r["time_s"] for r in rows["shift_edit"])
    t_theirs = statistics.median(r["time_s"] for r in rows["easyedit"])
    return {"median_s_shift_edit": t_ours, "median_s_easyedit": t_theirs, "speedup": t_theirs / t_ours,
            "delta_cosine_min": min(cosines), "delta_cosine": cosines, "delta_norm_ratio": norm_ratios,
            "decisions_differing": sum(x[1] != y[1] for ro, rt in pairs
                                       for x, y in zip(ro["decisions"], rt["decisions"])),
            "decisions": sum(len(r["decisions"]) for r in rows["shift_edit"]),
            "max_abs_nll_difference": max(abs(x - y) for ro, rt in pairs for x, y in zip(ro["nll"], rt["nll"])),
            "metrics_shift_edit": summary_of(rows["shift_edit"]), "metrics_easyedit": summary_of(rows["easyedit"]),
            "rows": rows, "hparams": hp.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--easyedit", type=Path, required=True, help="an EasyEdit checkout (the folder with easyeditor/)")
    ap.add_argument("--easyedit-commit", default=None, help="the checkout's commit, recorded in the result")
    ap.add_argument("--methods", default="ROME,MEMIT,AlphaEdit")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=5, help="records timed per method (after one warm-up record)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in EASYEDIT]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {sorted(EASYEDIT)}")
    if not (args.easyedit / "easyeditor" / "models" / "rome" / "rome_main.py").is_file():
        ap.error(f"{args.easyedit} is not an EasyEdit checkout (no easyeditor/models/rome/rome_main.py)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ee = load_easyedit(args.easyedit.resolve())
    model, tok = se.load_model(args.model)
    if model.config.model_type != "llama":
        ap.error("this comparison maps module names for Llama-architecture models only")
    records = json.load(open(require_data("counterfact-subset")))[: args.n + 1]
    result: dict[str, Any] = {"protocol": {
        "what": "per-edit time, ΔW and metrics: shift_edit vs EasyEdit's implementation, same inputs",
        "metric_family": "ROME probability comparisons (ES/PS/NS) and strict top-1 accuracy, per prompt",
        "threads": args.threads, "records": "counterfact-original-format-subset837.json, first n+1 (first: warm-up)",
        "easyedit_source_sha256": source_digest(args.easyedit.resolve()), "easyedit_commit": args.easyedit_commit,
        **provenance(model)}, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="easyedit_stats_") as tmp:
        for method in methods:
            hp, ee_hp = prepare(method, ee[method], model, tok, args.model, Path(tmp))
            res = result["methods"][method] = compare(method, ee[method], model, tok, records, hp, ee_hp)
            print(f"{method:10s} shift_edit {res['median_s_shift_edit']:6.2f} s  "
                  f"EasyEdit {res['median_s_easyedit']:6.2f} s  speedup {res['speedup']:5.2f}x  "
                  f"ΔW cosine min {res['delta_cosine_min']:.4f}  "
                  f"norm ratio {statistics.median(res['delta_norm_ratio']):.3f}  "
                  f"decisions differing {res['decisions_differing']}/{res['decisions']}  "
                  f"max |ΔNLL| {res['max_abs_nll_difference']:.2e}", flush=True)
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
