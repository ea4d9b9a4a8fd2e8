"""The one architecture table: where each model family keeps its MLP matrices.

Algorithms, lenses and metrics never branch on the model type. They ask a
:class:`ModelAdapter` for canonical pieces:

- ``ff2(layer)``: the MLP output matrix (the matrix the forward pass shift edits),
- ``ff1(layer)``: the MLP input matrices (two for gated MLPs: gate and up),
- ``decoding_matrix()``: the unembedding, one row per token, shape ``[vocab, d_model]``,
- ``input_embedding()``: the token embedding, shape ``[vocab, d_model]``,
- ``final_norm()``: the norm applied before the unembedding (for the Logit Lens).

Weight layout (GPT-2's ``Conv1D`` stores ``[in, out]``, ``nn.Linear`` stores
``[out, in]``) is decided in exactly one place, :func:`weight_layout`, from the
module's type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..core.errors import ShiftEditError, UnsupportedArchitectureError

Layout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class ArchSpec:
    """Module templates of one model family; ``{}`` stands for the layer index."""

    ff2: str
    ff1: tuple[str, ...]
    final_norm: str
    family: str  # a human name for `shift-edit models`


_LLAMA_LIKE = ArchSpec(
    ff2="model.layers.{}.mlp.down_proj",
    ff1=("model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj"),
    final_norm="model.norm",
    family="Llama-style gated MLP (gate_proj, up_proj -> down_proj)",
)

#: model_type (``config.model_type``) -> module templates. The only list of architectures.
ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        ff2="transformer.h.{}.mlp.c_proj",
        ff1=("transformer.h.{}.mlp.c_fc",),
        final_norm="transformer.ln_f",
        family="GPT-2 (Conv1D c_fc -> c_proj)",
    ),
    "gpt_neo": ArchSpec(
        ff2="transformer.h.{}.mlp.c_proj",
        ff1=("transformer.h.{}.mlp.c_fc",),
        final_norm="transformer.ln_f",
        family="GPT-Neo (Linear c_fc -> c_proj)",
    ),
    "gptj": ArchSpec(
        ff2="transformer.h.{}.mlp.fc_out",
        ff1=("transformer.h.{}.mlp.fc_in",),
        final_norm="transformer.ln_f",
        family="GPT-J (fc_in -> fc_out)",
    ),
    "gpt_neox": ArchSpec(
        ff2="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        ff1=("gpt_neox.layers.{}.mlp.dense_h_to_4h",),
        final_norm="gpt_neox.final_layer_norm",
        family="GPT-NeoX / Pythia (dense_h_to_4h -> dense_4h_to_h)",
    ),
    "bloom": ArchSpec(
        ff2="transformer.h.{}.mlp.dense_4h_to_h",
        ff1=("transformer.h.{}.mlp.dense_h_to_4h",),
        final_norm="transformer.ln_f",
        family="BLOOM (dense_h_to_4h -> dense_4h_to_h)",
    ),
    "falcon": ArchSpec(
        ff2="transformer.h.{}.mlp.dense_4h_to_h",
        ff1=("transformer.h.{}.mlp.dense_h_to_4h",),
        final_norm="transformer.ln_f",
        family="Falcon (dense_h_to_4h -> dense_4h_to_h)",
    ),
    "opt": ArchSpec(
        ff2="model.decoder.layers.{}.fc2",
        ff1=("model.decoder.layers.{}.fc1",),
        final_norm="model.decoder.final_layer_norm",
        family="OPT (fc1 -> fc2)",
    ),
    "phi": ArchSpec(
        ff2="model.layers.{}.mlp.fc2",
        ff1=("model.layers.{}.mlp.fc1",),
        final_norm="model.final_layernorm",
        family="Phi-1/1.5/2 (fc1 -> fc2)",
    ),
    "phi3": ArchSpec(
        ff2="model.layers.{}.mlp.down_proj",
        ff1=("model.layers.{}.mlp.gate_up_proj",),
        final_norm="model.norm",
        family="Phi-3 (fused gate_up_proj -> down_proj)",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
}


def supported_model_types() -> list[str]:
    """The model types with a table entry, sorted."""
    return sorted(ARCHITECTURES)


def weight_layout(module: nn.Module) -> Layout:
    """The storage layout of a projection's weight, decided by the module's type.

    Returns ``"in_out"`` for GPT-2's ``Conv1D`` (``weight`` is ``[in, out]``) and
    ``"out_in"`` for ``nn.Linear`` and its subclasses (``weight`` is ``[out, in]``).

    Raises:
        ShiftEditError: the module is neither.
    """
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "in_out"
    if isinstance(module, nn.Linear):
        return "out_in"
    raise ShiftEditError(
        f"cannot edit a {type(module).__name__}: only nn.Linear and transformers' Conv1D "
        "projections are supported"
    )


def to_param_layout(canonical: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Turn an ``[out, in]`` matrix into the storage layout of a weight."""
    return canonical if layout == "out_in" else canonical.T


def from_param_layout(weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """View a stored weight as ``[out, in]``."""
    return weight if layout == "out_in" else weight.T


def _text_config(config):  # multimodal wrappers keep the LM's settings in text_config
    return getattr(config, "text_config", None) or config


class ModelAdapter:
    """Canonical access to one loaded model's MLP matrices, embeddings and final norm.

    Args:
        model: a Hugging Face causal LM.
        ff2_template / ff1_templates / final_norm: explicit module paths that override
            (or replace, for unknown model types) the table entry; ``{}`` is the layer.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        ff2_template: str | None = None,
        ff1_templates: tuple[str, ...] | list[str] | None = None,
        final_norm: str | None = None,
    ) -> None:
        self.model = model
        config = _text_config(model.config)
        self.model_type: str = getattr(config, "model_type", type(model).__name__)
        spec = ARCHITECTURES.get(self.model_type)
        if spec is None and ff2_template is None:
            raise UnsupportedArchitectureError(
                f"model type {self.model_type!r} is not in the architecture table "
                f"(supported: {', '.join(supported_model_types())}); pass the module templates "
                "explicitly in the hparams, e.g. ff2_template: 'model.layers.{}.mlp.down_proj', "
                "ff1_templates: ['model.layers.{}.mlp.up_proj'], final_norm: 'model.norm'"
            )
        self.ff2_template = ff2_template or spec.ff2
        self.ff1_templates = tuple(ff1_templates) if ff1_templates else (spec.ff1 if spec else ())
        self.final_norm_path = final_norm or (spec.final_norm if spec else None)
        self.n_layers: int = int(config.num_hidden_layers)
        if "{}" not in self.ff2_template:
            raise ShiftEditError(
                f"ff2_template {self.ff2_template!r} has no '{{}}' placeholder for the layer index"
            )

    # --- module lookup -------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        """Validate a layer index (negative counts from the end) and return it non-negative."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ShiftEditError(f"layer must be an integer, got {layer!r}")
        if not -self.n_layers <= layer < self.n_layers:
            raise ShiftEditError(
                f"layer {layer} is out of range: this {self.model_type} model has "
                f"{self.n_layers} layers (0..{self.n_layers - 1})"
            )
        return layer % self.n_layers

    def module(self, path: str) -> nn.Module:
        """The submodule at ``path``; a clear error names the path when it does not exist."""
        try:
            return self.model.get_submodule(path)
        except AttributeError as exc:
            raise ShiftEditError(
                f"no module {path!r} in this {self.model_type} model; check the module templates"
            ) from exc

    def ff2_name(self, layer: int) -> str:
        return self.ff2_template.format(self.check_layer(layer))

    def ff2(self, layer: int) -> nn.Module:
        """The MLP output projection (FF2) of ``layer``."""
        return self.module(self.ff2_name(layer))

    def ff1_names(self, layer: int) -> list[str]:
        layer = self.check_layer(layer)
        return [t.format(layer) for t in self.ff1_templates]

    def ff1(self, layer: int) -> list[nn.Module]:
        """The MLP input projection(s) (FF1) of ``layer``: two for gated MLPs (gate, up)."""
        return [self.module(n) for n in self.ff1_names(layer)]

    def layout(self, module: nn.Module) -> Layout:
        return weight_layout(module)

    # --- decoder blocks ---------------------------------------------------------------------
    @property
    def blocks_path(self) -> str:
        """The ModuleList of decoder blocks, read off the FF2 template
        (``model.layers.{}.mlp.down_proj`` -> ``model.layers``)."""
        return self.ff2_template.split("{}")[0].rstrip(".")

    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        blocks = self.module(self.blocks_path)
        if not isinstance(blocks, nn.ModuleList):
            raise ShiftEditError(f"{self.blocks_path!r} is not a ModuleList of decoder blocks")
        return blocks

    def block_of(self, module_path: str) -> int | None:
        """The decoder block index a module belongs to, or None outside the blocks."""
        head = self.blocks_path + "."
        if not module_path.startswith(head):
            return None
        first = module_path[len(head):].split(".", 1)[0]
        return int(first) if first.isdigit() else None

    # --- vocabulary side --------------------------------------------------------------------
    def decoding_matrix(self) -> torch.Tensor:
        """The unembedding ``[vocab, d_model]`` (lm_head weight; tied models share the embedding)."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise ShiftEditError(f"this {self.model_type} model has no output embedding (lm_head)")
        return head.weight

    def input_embedding(self) -> torch.Tensor:
        """The token embedding ``[vocab, d_model]``."""
        return self.model.get_input_embeddings().weight

    def final_norm(self) -> nn.Module:
        """The norm before the unembedding, as used by the Logit Lens."""
        if self.final_norm_path is None:
            raise ShiftEditError("no final_norm is known for this model; pass final_norm explicitly")
        return self.module(self.final_norm_path)

    def param_name(self, module_path: str) -> str:
        """The state-dict name of a module's weight."""
        return f"{module_path}.weight"
