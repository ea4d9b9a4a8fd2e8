"""Why the edits of a SHIFT_NEURON lifelong run fail: one category per edit that does not hold at a checkpoint.

    python eval/shift_plus/lifelong_failures.py RUN_DIR T [--out failures.json]

RUN_DIR is a ``shift-edit bench --sequential`` run's ``seq_000`` folder with its ``state/`` saved after ``T`` edits
(``--save-every``; a run keeps only its latest state). The saved weights and memory are loaded into the unedited model
as the run resumes them; each edited record's prompt is run once, reading every rewritten neuron's activation at the
prompt's last token (the FF2 input). A rewritten neuron's target is the decoding row its FF2 column points along
(cosine). For an edit that does not hold (strict top-1, from
the checkpoint), the category is:

- ``not applied``: no rewritten neuron for its target fires (the screen or the push cap refused it);
- ``misfire above``: another edit's neuron fires on its prompt (activation > 2), every such neuron in a layer above
  the edit's own;
- ``misfire``: the same with a neuron at or below the edit's layer;
- ``own weakened``: no misfire, its own neuron fires below 0.94 of the designed activation;
- ``other``: its own neuron fires as designed and nothing else does (the margin was eroded by small activations).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

from shift_edit.algorithms.shift.shift_neuron import memory_used, mlp_of
from shift_edit.bench.counterfact import load_counterfact
from shift_edit.bench.seq_state import load_state
from shift_edit.core.errors import ShiftEditError
from shift_edit.core.requests import encode_prompt, encode_target
from shift_edit.files.io import model_fingerprint
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.hooks import capture_inputs
from shift_edit.model.loading import load_model

#: an activation above this is a neuron firing (the designed activation at an edit is 8)
FIRES = 0.5
#: a misfire strong enough to matter
STRONG = 2.0


def categorise(row: dict, activation: float) -> str:
    """The category of a failed edit from its own neuron's activation and layer and the other neurons firing."""
    if row["own"] <= FIRES:
        return "not applied"
    strong = [o for o in row["others"] if o["activation"] > STRONG]
    if strong:
        return "misfire above" if all(o["layer"] > row["own_layer"] for o in strong) else "misfire"
    return "own weakened" if row["own"] < 0.94 * activation else "other"


@torch.no_grad()
def failures(run: Path, t: int) -> dict:
    params = json.loads((run / "params.json").read_text())
    hp = params["match"]["hparams"]
    model, tok = load_model(params["match"]["model"]["name"])
    loaded = load_state(run / "state", model, model_fingerprint(model))
    if loaded is None or loaded[0].n_edits != t:
        raise ShiftEditError(f"{run}/state does not hold the state after {t} edits")
    memory = loaded[1]
    adapter = ModelAdapter(model)
    dec = adapter.decoding_matrix().detach().float()
    dec_unit = dec / dec.norm(dim=-1, keepdim=True)
    neurons: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (neuron ids, target token of each)
    for layer in hp["layers"]:
        mlp = mlp_of(adapter, layer)
        idx = torch.tensor(sorted(memory_used(memory, mlp)), dtype=torch.long)
        if len(idx):
            neurons[layer] = (idx, (dec_unit @ mlp.ff2_weight()[:, idx].float()).argmax(0))
    ff2 = {layer: adapter.ff2_name(layer) for layer in neurons}  # the FF2 input: the neurons' activations
    ckpt = json.loads((run / "checkpoints" / f"ckpt_{t}.json").read_text())
    held = {r["case_id"]: r["efficacy_top1"] for r in ckpt["records"]}
    cases = {c.case_id: c for c in load_counterfact(params["data"]["path"])}
    rows = []
    for case_id in params["match"]["order"][:t]:
        req = cases[case_id].request
        target = encode_target(tok, req.text, req.target_new)[0]
        with capture_inputs(model, list(ff2.values())) as cap:
            model(input_ids=torch.tensor([encode_prompt(tok, req.text)]))
        row = {"case_id": case_id, "held": held[case_id], "own": 0.0, "own_layer": None, "others": []}
        for layer, (idx, tokens) in neurons.items():
            a = cap.inputs[ff2[layer]][0, -1, idx].float()
            for k in (a.abs() > FIRES).nonzero()[:, 0].tolist():
                if int(tokens[k]) == target and float(a[k]) > row["own"]:
                    row["own"], row["own_layer"] = float(a[k]), layer
                elif int(tokens[k]) != target:
                    row["others"].append({"layer": layer, "token": int(tokens[k]), "activation": float(a[k])})
        rows.append(row)
    failed = [r for r in rows if not r["held"]]
    for r in failed:
        r["category"] = categorise(r, hp["activation"])
    counts = collections.Counter(r["category"] for r in failed)
    return {"run": str(run), "edits": t, "held": len(rows) - len(failed), "failed": len(failed),
            "categories": dict(counts.most_common()),
            "neurons_per_layer": {str(layer): len(idx) for layer, (idx, _) in neurons.items()}, "failures": failed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("t", type=int)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = failures(args.run, args.t)
    print(json.dumps({k: v for k, v in out.items() if k != "failures"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
