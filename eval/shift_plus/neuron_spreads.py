"""How far SHIFT_NEURON's thresholds sit from generic text, and what a per-neuron threshold buys.

For the first ``--n`` records, one SHIFT_NEURON edit each is computed at one layer (on the unedited model, nothing
applied) for every hparams variant; the rewritten neurons' FF1 rows are then scored on their own:
- **held-out text**: WikiText-2 test lines from the end of the file (outside the 50,000 tokens the cached statistics
  read), the neuron's activation at every token: how often it fires (activation > 10% of its value at the edit), and
  the mean squared push it would add per token summed over the N neurons (``Σ_n (a_n / a_e · s_n)²``: what N
  sequential edits cost generic text);
- **paraphrases / neighbours**: the neuron's activation at the last token of each paraphrase and neighbourhood
  prompt, relative to its value at the edit (the share of the push they receive);
- the chosen threshold ``β``, its spreads (``β / √(gᵀΣg)``) and how many edits reached the margin.

    SHIFT_EDIT_DATA=../shared/data python eval/shift_plus/neuron_spreads.py --layer 26 --n 60 \\
        --variant base='{}' --variant s7='{"min_spreads": 7}' --out eval/reports/shift_plus/neuron_spreads/X.json
    python eval/shift_plus/neuron_spreads.py --table eval/reports/shift_plus/neuron_spreads/*.json   # markdown
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.bench.counterfact import load_counterfact
from shift_edit.bench.wikitext import read_wikitext_lines
from shift_edit.core.registry import get_algorithm, load_hparams
from shift_edit.core.requests import encode_prompt
from shift_edit.files.data_files import find_data
from shift_edit.files.io import atomic_write_json
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.hooks import capture_inputs

HPARAMS = Path(__file__).resolve().parents[2] / "hparams" / "SHIFT_NEURON" / "smollm2-135m.yaml"


def mlp_inputs(model, tok, name: str, texts: list[str], max_len: int = 256) -> list[torch.Tensor]:
    """The MLP input (``name``'s input) at every token of each text, float64 ``[len, d]``."""
    out = []
    for text in texts:
        ids = torch.tensor([encode_prompt(tok, text)[:max_len]])
        with torch.no_grad(), capture_inputs(model, [name]) as cap:
            model(input_ids=ids, use_cache=False)
        out.append(cap.inputs[name].reshape(ids.shape[1], -1).double())
    return out


def neuron_rows(computed, names: tuple[str, str], neurons: list[int], model) -> dict[int, dict[str, torch.Tensor]]:
    """The new gate / up rows (Llama layout, ``[d_ff, d]``) of each rewritten neuron: old row + the delta's row."""
    params = dict(model.named_parameters())
    full = {d.module: d.canonical() for d in computed.deltas if d.module in names}
    return {j: {n: params[f"{n}.weight"].detach()[j].double() + full[n][j].double() for n in names} for j in neurons}


COLUMNS = [("reached_margin", "reached %"), ("threshold_median", "β"), ("spreads_median", "spreads"),
           ("gate_row_norm_over_matrix_median", "row / matrix norm"), ("fires_per_1k_tokens", "fires / 1k tok"),
           ("push_energy_per_token_mean", "push energy / tok"), ("push_energy_per_token_max", "max"),
           ("paraphrase_fires", "para fires %"), ("neighbour_fires", "nbr fires %")]


def table(paths: list[str]) -> str:
    """A markdown table of saved results, one row per variant."""
    out = ["| file | variant | layer | N | " + " | ".join(c for _k, c in COLUMNS) + " |",
           "|" + "---|" * (4 + len(COLUMNS))]
    for path in paths:
        res = json.loads(Path(path).read_text())
        for name, row in res["variants"].items():
            cells = ["-" if row.get(k) is None else str(row[k]) for k, _c in COLUMNS]
            out.append(f"| {Path(path).name} | {name} `{json.dumps(row['override'])}` | {res['layer']} | {res['n']} | "
                       + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--table":
        sys.stdout.write(table(argv[1:]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=26)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--data", default="counterfact-easyedit-edit.json")
    ap.add_argument("--heldout-lines", type=int, default=120, help="WikiText test lines from the end of the file")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON overrides of the shipped hparams")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = se.load_model("smollm2-135m")
    adapter = ModelAdapter(model)
    gate_name, up_name = adapter.ff1_names(args.layer)
    cases = load_counterfact(Path(find_data("wikitext")).parents[1] / args.data, limit=args.n)
    lines = [x for x in read_wikitext_lines(str(find_data("wikitext"))) if len(x) >= 30][-args.heldout_lines:]
    per_line = mlp_inputs(model, tok, gate_name, lines)
    generic = torch.cat(per_line)
    position = torch.cat([torch.arange(len(x)) for x in per_line])  # each token's position in its line
    algo = get_algorithm("SHIFT_NEURON")
    results = {}
    for spec in args.variant or ["base={}"]:
        name, _, js = spec.partition("=")
        hp = load_hparams(HPARAMS).replace(**{"layers": [args.layer], **json.loads(js or "{}")})
        betas, spreads, reached, para, nbr, norms = [], [], [], [], [], []
        gate_norm = float(dict(model.named_parameters())[f"{gate_name}.weight"].norm())
        energy = torch.zeros(len(generic), dtype=torch.float64)
        fires = 0
        n_neurons = 0
        for case in cases:
            computed = algo.compute(model, tok, [case.request], hp)
            info = computed.info[0]
            if computed.skipped[0] or "neurons" not in info:
                continue
            reached.append(bool(info["reached_margin"]))
            if not computed.deltas:  # not applied (if_unreached: skip)
                continue
            spreads += info["spreads"]
            betas += info.get("thresholds", [])
            rows = neuron_rows(computed, (gate_name, up_name), info["neurons"], model)
            push = info["push"] or hp.max_push
            for j in info["neurons"]:
                g, u = rows[j][gate_name], rows[j][up_name]
                norms.append(float(g.norm()) / gate_norm)

                def act(x: torch.Tensor) -> torch.Tensor:
                    return torch.nn.functional.silu(x @ g) * (x @ u)

                a = act(generic) / hp.activation
                fires += int((a.abs() > 0.1).sum())
                energy += (a * push) ** 2
                n_neurons += 1
                if j == info["neurons"][0]:
                    prompts = case.paraphrase_prompts or case.rephrase_prompts
                    for bucket, texts in ((para, prompts), (nbr, case.neighborhood_prompts)):
                        if texts:
                            last = torch.stack([x[-1] for x in mlp_inputs(model, tok, gate_name, list(texts))])
                            bucket += (act(last) / hp.activation).tolist()
        med = lambda v: round(statistics.median(v), 3) if v else None  # noqa: E731
        row = {
            "override": json.loads(js or "{}"),
            "edits": len(reached),
            "neurons": n_neurons,
            "reached_margin": round(100 * sum(reached) / max(len(reached), 1), 1),
            "threshold_median": med(betas),
            "spreads_median": med(spreads),
            "spreads_min": min(spreads, default=None),
            "gate_row_norm_over_matrix_median": med(norms),
            "gate_row_norm_over_matrix_max": round(max(norms, default=0), 3),
            "heldout_tokens": len(generic),
            "fires_per_1k_tokens": round(1000 * fires / len(generic), 3),
            "push_energy_per_token_mean": round(float(energy.mean()), 2),
            "push_energy_per_token_max": round(float(energy.max()), 1),
            "push_energy_share_at_position_0": round(
                float(energy[position == 0].sum() / energy.sum().clamp_min(1e-30)), 3
            ),
            "push_energy_per_token_mean_after_position_0": round(float(energy[position > 0].mean()), 2),
            "paraphrase_share_median": med(para),
            "paraphrase_fires": round(100 * sum(x > 0.5 for x in para) / max(len(para), 1), 1),
            "neighbour_share_median": med(nbr),
            "neighbour_fires": round(100 * sum(x > 0.5 for x in nbr) / max(len(nbr), 1), 1),
        }
        results[name] = row
        print(name, json.dumps(row), flush=True)
    if args.out:
        atomic_write_json(args.out, {"layer": args.layer, "n": args.n, "data": args.data,
                                     "heldout_lines": args.heldout_lines, "variants": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
