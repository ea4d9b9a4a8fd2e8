"""One forward and one backward pass: the inputs x_i, VJPs δ_i and gradients of every MLP matrix.

The loss is the NLL of the target's first token at the last prompt position (the
Backward Lens setting). For every layer and every FF1/FF2 matrix ``W`` (from the
architecture table) we record

- ``x``: the matrix's forward input per prompt position, ``[n, d_in]``,
- ``delta``: the VJP, i.e. the gradient of the loss w.r.t. the matrix's output, ``[n, d_out]``,
- ``grad``: the gradient w.r.t. the weight, in the weight's own storage layout.

In the paper's notation (``in_out`` layout, GPT-2's Conv1D) ``grad = Σ_i x_iᵀ δ_i``;
for ``nn.Linear`` (``out_in``) it is the transpose, ``Σ_i δ_iᵀ x_i``.

Gated MLPs (Llama's ``gate_proj`` and ``up_proj``) have two FF1 matrices fed by the
same input: both :class:`MatrixCapture` entries hold the same ``x`` (one tensor,
shared, not copied) and each has its own ``delta``; :attr:`LayerCapture.ff1_x` is that
shared input and :meth:`LayerCapture.ff1_delta_norm` combines both VJPs. Fused
``gate_up_proj`` (Phi-3) is one matrix whose δ covers both halves.

OPT flattens tokens inside its MLP (``[batch*seq, d]``); inputs and VJPs are reshaped
to ``[n, d]`` for every model, so callers never see the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import ShiftEditError
from ..core.requests import encode_prompt, encode_target, with_leading_space
from ..model.architectures import Layout, ModelAdapter, from_param_layout
from ..model.hooks import OwnedHooks


@dataclass
class MatrixCapture:
    """x_i, δ_i and the weight gradient of one matrix (float32, CPU, detached)."""

    name: str
    kind: str  # "ff1" or "ff2"
    layer: int
    layout: Layout
    x: torch.Tensor  # [n, d_in]
    delta: torch.Tensor  # [n, d_out]
    grad: torch.Tensor | None  # weight layout: [in, out] for "in_out", [out, in] for "out_in"
    dtype: torch.dtype = torch.float32  # the precision the model computed in (for tolerances)

    @property
    def canonical_grad(self) -> torch.Tensor:
        """The gradient as ``[out, in]``."""
        if self.grad is None:
            raise ValueError(f"{self.name}: captured without weight gradients (weight_grads=False)")
        return from_param_layout(self.grad, self.layout)


@dataclass
class LayerCapture:
    """The FF1 matrices (one, or gate and up) and the FF2 matrix of one layer."""

    layer: int
    ff1: list[MatrixCapture]
    ff2: MatrixCapture

    @property
    def ff1_x(self) -> torch.Tensor:
        """The FF1 input ``[n, d_model]``, shared by gate and up projections of gated MLPs."""
        return self.ff1[0].x

    def ff1_delta_norm(self) -> torch.Tensor:
        """Per-position norm of the FF1 VJPs, ``sqrt(Σ_matrices ||δ_i||²)``, shape ``[n]``."""
        return torch.stack([(m.delta.double() ** 2).sum(-1) for m in self.ff1]).sum(0).sqrt().float()


@dataclass
class GradientCapture:
    """Everything one forward + backward pass of the target NLL recorded."""

    prompt: str
    target: str
    input_ids: list[int]
    target_id: int  # first token of the target; the loss is -log p(target_id | prompt)
    original_id: int  # the model's top-1 next token before any edit
    loss: float
    target_prob: float
    layers: list[LayerCapture] = field(default_factory=list)

    @property
    def n(self) -> int:
        """The prompt length in tokens."""
        return len(self.input_ids)

    def matrices(self) -> list[MatrixCapture]:
        """All captured matrices, layer by layer (FF1 first)."""
        return [m for lc in self.layers for m in (*lc.ff1, lc.ff2)]


# length: one forward and one backward pass whose hooks fill the capture as they run; the hooks, the requires_grad
#   flags they need and their restoring in `finally` read best in one place
def capture_gradients(
    model: nn.Module,
    tok,
    prompt: str,
    target: str,
    *,
    adapter: ModelAdapter | None = None,
    layers: list[int] | None = None,
    weight_grads: bool | Sequence[int] = True,
) -> GradientCapture:
    """Run the prompt forward, back-propagate the target's NLL at the last position, capture.

    Args:
        model: a causal LM; its weights and ``.grad`` fields are left untouched.
        tok: its tokenizer.
        prompt: the prompt text (subject filled in).
        target: the target object; a leading space is added when the prompt needs one.
        adapter: the model's :class:`ModelAdapter` (built from the table if omitted).
        layers: the layers to capture (default: all).
        weight_grads: also return the weight gradients: ``True`` for every captured layer,
            ``False`` for none (only x_i and δ_i: the memory of large models' gradients is
            saved, and ranks come from the factors), or a list of layers.

    Returns:
        A :class:`GradientCapture` with, per layer, FF1 and FF2 x_i, δ_i and gradients.

    Raises:
        ShiftEditError: empty prompt or target.
    """
    if not prompt or not prompt.strip():
        raise ShiftEditError("the prompt is empty")
    if not target or not target.strip():
        raise ShiftEditError("the target is empty")
    adapter = adapter or ModelAdapter(model)
    target = with_leading_space(prompt, target)
    ids = encode_prompt(tok, prompt)
    if not ids:
        raise ShiftEditError(f"prompt {prompt!r} tokenises to no tokens")
    target_id = encode_target(tok, prompt, target)[0]
    layer_ids = list(range(adapter.n_layers)) if layers is None else [adapter.check_layer(x) for x in layers]

    specs: list[tuple[str, str, int, nn.Module]] = []  # (name, kind, layer, module)
    for layer in layer_ids:
        for name in adapter.ff1_names(layer):
            specs.append((name, "ff1", layer, adapter.module(name)))
        specs.append((adapter.ff2_name(layer), "ff2", layer, adapter.ff2(layer)))
    layouts = {name: adapter.layout(mod) for name, _, _, mod in specs}

    device = next(model.parameters()).device
    n = len(ids)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def pre_hook(name):
        def hook(_mod, args):
            inputs[name] = args[0]
        return hook

    def post_hook(name):
        def hook(_mod, _args, out):
            outputs[name] = out
        return hook

    if isinstance(weight_grads, bool):
        grad_layers = set(layer_ids) if weight_grads else set()
    else:
        grad_layers = {adapter.check_layer(x) for x in weight_grads}
    all_weights = [mod.weight for _, _, _, mod in specs]  # need requires_grad for a graph to exist
    grad_specs = [k for k, spec in enumerate(specs) if spec[2] in grad_layers]
    weights = [all_weights[k] for k in grad_specs]
    saved_flags = [w.requires_grad for w in all_weights]
    hooks = OwnedHooks()
    try:
        for name, _, _, mod in specs:
            hooks.forward_pre_hook(mod, pre_hook(name))
            hooks.forward_hook(mod, post_hook(name))
        for w in all_weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            input_ids = torch.tensor([ids], device=device)
            logits = model(input_ids=input_ids, use_cache=False).logits[0, -1].float()
            logp = torch.log_softmax(logits, -1)
            loss = -logp[target_id]
            missing = [name for name, *_ in specs if name not in outputs]
            if missing:
                raise ShiftEditError(f"modules never ran in the forward pass: {missing[:3]}")
            outs = [outputs[name] for name, *_ in specs]
            grads = torch.autograd.grad(loss, weights + outs, allow_unused=True)
    finally:
        hooks.remove_all()
        for w, flag in zip(all_weights, saved_flags):
            w.requires_grad_(flag)

    nw = len(weights)
    grad_index = {k: i for i, k in enumerate(grad_specs)}
    capture = GradientCapture(
        prompt=prompt, target=target, input_ids=ids, target_id=int(target_id),
        original_id=int(logits.detach().argmax()), loss=float(loss.detach()),
        target_prob=float(logp.detach()[target_id].exp()),
    )
    shared_x: dict[tuple[int, int], torch.Tensor] = {}  # (layer, data_ptr) -> one shared tensor
    by_layer: dict[int, dict[str, list[MatrixCapture]]] = {x: {"ff1": [], "ff2": []} for x in layer_ids}
    for k, (name, kind, layer, mod) in enumerate(specs):
        raw_x = inputs[name]
        key = (layer, raw_x.data_ptr())
        if key not in shared_x:  # gate_proj and up_proj get the very same input tensor
            shared_x[key] = raw_x.detach().reshape(-1, raw_x.shape[-1])[-n:].float().cpu()
        out = outs[k]
        d_out = out.shape[-1]
        vjp = grads[nw + k]
        delta = (torch.zeros(n, d_out) if vjp is None else vjp.detach().reshape(-1, d_out)[-n:].float().cpu())
        grad = None
        if k in grad_index:
            grad = grads[grad_index[k]]
            grad = (torch.zeros(mod.weight.shape) if grad is None else grad.detach().float().cpu())
        by_layer[layer][kind].append(
            MatrixCapture(name, kind, layer, layouts[name], shared_x[key], delta, grad, mod.weight.dtype))
    capture.layers = [LayerCapture(x, by_layer[x]["ff1"], by_layer[x]["ff2"][0]) for x in layer_ids]
    return capture
