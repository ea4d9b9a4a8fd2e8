"""Files shipped inside the package: the hparams of ``hparams/<ALG>/<model>.yaml``.

The repository keeps them at its root (``hparams/``); the package reaches them as
``shift_edit/_hparams`` (a link in the source tree, real files in a wheel or sdist), always
through :mod:`importlib.resources`, so a checkout, an editable install and an installed
wheel find the same files and the library never looks outside itself. ``shift-edit edit`` and
``shift-edit bench`` reach :func:`shipped_hparams` through the registry
(:meth:`~shift_edit.core.registry.Algorithm.shipped_hparams`).
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

#: hub names or folder names whose shipped hparams file has another stem (files follow the aliases)
HPARAMS_STEMS = {"smollm2-135m-instruct": "smollm2-135m"}


def hparams_root() -> Traversable:
    """The folder of shipped hparams inside the installed package."""
    return resources.files("shift_edit").joinpath("_hparams")


def model_stem(model: str) -> str:
    """The file stem shipped hparams use for a model: an alias, hub id, folder or ``.gguf`` path.

    ``gpt2-xl`` -> ``gpt2-xl``; ``meta-llama/Llama-2-7b-hf`` -> ``llama-2-7b``;
    ``HuggingFaceTB/SmolLM2-135M-Instruct`` -> ``smollm2-135m``.
    """
    stem = Path(str(model).rstrip("/")).name.lower().removesuffix(".gguf").removesuffix("-hf")
    return HPARAMS_STEMS.get(stem, stem)


def _as_path(t: Traversable) -> Path:
    # setuptools installs (wheel, sdist, editable) put package data on the file system
    return t if isinstance(t, Path) else Path(str(t))


def shipped_hparams(alg: str, model: str, variant: str | None = None) -> Path | None:
    """The shipped hparams file of ``alg`` for ``model`` (``<stem>-<variant>.yaml`` if given), or None."""
    name = f"{model_stem(model)}-{variant}.yaml" if variant else f"{model_stem(model)}.yaml"
    t = hparams_root().joinpath(alg, name)
    return _as_path(t) if t.is_file() else None


def shipped_hparams_index() -> dict[str, list[str]]:
    """``{ALG: [model stems]}`` of every shipped hparams file, sorted."""
    root = hparams_root()
    if not root.is_dir():
        return {}
    out: dict[str, list[str]] = {}
    for alg in sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name):
        stems = sorted(f.name[: -len(".yaml")] for f in alg.iterdir() if f.name.endswith(".yaml"))
        if stems:
            out[alg.name] = stems
    return out


def model_name_of(model) -> str:
    """The name a model was loaded under (:func:`~shift_edit.model.loading.load_model` records it)."""
    return str(
        getattr(model, "_shift_edit_name", None) or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    )


def hparams_model_mismatch(hparams, model) -> str | None:
    """``"these hparams were written for gpt2-xl, not smollm2-135m"`` when the hparams'
    ``model_name`` names another model than ``model`` (a name or a loaded model), else None."""
    written_for = str(getattr(hparams, "model_name", "") or "")
    name = model if isinstance(model, str) else model_name_of(model)
    if not written_for or not name or model_stem(written_for) == model_stem(name):
        return None
    return f"these {type(hparams).ALG_NAME} hparams were written for {written_for}, not {name}"
