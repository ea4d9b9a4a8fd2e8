"""Why a lifelong SHIFT_NEURON run broke: which rewritten neurons fire on ordinary text, and how far below the
generic mean their thresholds sit.

Reads a sequential run's saved state (``<run>/seq_000/state/``: the edited matrices and the memory, whose one-hot FF2
keys name the rewritten neurons), applies it to SmolLM2 and prints (1) per WikiText line (the perplexity protocol's
first 3 lines of >= 30 characters, 256 tokens) the mean NLL unedited -> edited and the positions that got worst,
(2) per layer how many rewritten neurons fire (|activation| > 0.8, of 8 at their edit) at the worst position of the
first line, (3) per layer the median spread of the neurons' gate pre-activation on generic text (the cached MLP-input
statistics) by quarter of the edit order, and how many spreads the threshold sits below the mean.

    SHIFT_EDIT_DATA=../shared/data python eval/shift_plus/neuron_misfire.py RUN_DIR/SHIFT_NEURON/seq_000/state
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import shift_edit as se
from shift_edit.bench.seq_state import load_state
from shift_edit.bench.wikitext import read_wikitext_lines
from shift_edit.core.deltas import restore_weights
from shift_edit.core.requests import encode_prompt
from shift_edit.files.data_files import find_data
from shift_edit.files.io import model_fingerprint
from shift_edit.model.architectures import ModelAdapter
from shift_edit.model.covariance import layer_stats
from shift_edit.model.hooks import capture_inputs


def line_nll(model, tok, lines: list[str]) -> list[torch.Tensor]:
    out = []
    for line in lines:
        ids = torch.tensor([encode_prompt(tok, line)[:256]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        out.append(-lp.gather(1, ids[0, 1:, None])[:, 0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("state", help="the run's state folder (state.json and its checksummed tensor file)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    state = Path(args.state)
    model, tok = se.load_model("smollm2-135m")
    loaded = load_state(state, model, model_fingerprint(model))  # verified; loads the edited weights into model
    if loaded is None:
        raise SystemExit(f"{state} holds no saved state")
    _, mem, originals = loaded
    weights = {name: model.get_parameter(name).detach().clone() for name in originals}
    memory = {param: mem.keys(param) for param in mem.params()}
    restore_weights(model, originals)  # back to the unedited model; the edited values are applied below
    adapter = ModelAdapter(model)
    lines = [x for x in read_wikitext_lines(str(find_data("wikitext"))) if len(x) >= 30][:3]
    base = line_nll(model, tok, lines)
    stats = {}
    layers = sorted({int(k.split(".")[2]) for k in weights})
    for layer in layers:
        s = layer_stats(model, tok, [layer], site="ff1", n_tokens=50_000, max_length=128, progress=False)[layer]
        stats[layer] = (s.mean.double(), s.mom2.double() - torch.outer(s.mean.double(), s.mean.double()))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    edited = line_nll(model, tok, lines)
    for i, (b, e) in enumerate(zip(base, edited)):
        top = (e - b).topk(5)
        print(f"line {i}: mean NLL {float(b.mean()):.2f} -> {float(e.mean()):.2f}; worst positions "
              f"{top.indices.tolist()} (+{', +'.join(f'{x:.0f}' for x in top.values.tolist())} nats)")
    ids = torch.tensor([encode_prompt(tok, lines[0])[:256]])
    names = {layer: adapter.ff2_name(layer) for layer in layers}
    with torch.no_grad(), capture_inputs(model, list(names.values())) as cap:
        model(input_ids=ids)
    for layer, name in names.items():
        neurons = memory[f"{name}.weight"].abs().argmax(1)
        firing = (cap.inputs[name][0][:, neurons].abs() > 0.8).sum(1)
        mu, sigma = stats[layer]
        gate = weights[f"{adapter.ff1_names(layer)[0]}.weight"].double()[neurons]
        spread, mean = (gate @ sigma * gate).sum(1).sqrt(), gate @ mu
        q = max(len(neurons) // 4, 1)
        quarters = [round(float(spread[i * q:(i + 1) * q].median()),
                          2) for i in range(4) if len(spread[i * q:(i + 1) * q])]
        print(f"layer {layer}: {len(neurons)} rewritten neurons; line 0: at most {int(firing.max())} fire at one "
              f"position, "
              f"{int((firing > 0).sum())} of {len(firing)} positions have one; gate pre-activation on generic text: "
              f"mean "
              f"{float(mean.median()):.1f}, spread by quarter of the edits {quarters}, threshold "
              f"{float((-mean / spread).median()):.1f} spreads below the mean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
