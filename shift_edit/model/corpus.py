"""The text corpus the statistics are read from, streamed as batches of token ids.

A corpus is a local text file (one text per line; the local WikiText copy by default, found through
:mod:`shift_edit.files.data_files`) or a ``datasets`` data set (``hf:name/config/split``, needs the ``hub`` extra).
Its identity (name and sha256, or the data set's fingerprint) keys the caches built from it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ShiftEditError
from ..files.data_files import find_data
from ..files.io import file_sha256

log = logging.getLogger(__name__)


#: The corpus used when none is given and no local WikiText copy is found (needs internet).
HF_DEFAULT_CORPUS = "hf:wikitext/wikitext-103-raw-v1/train"


LOCAL_WIKITEXT = Path("wikitext-2-raw-v1") / "wiki.test.nonblank.raw"


def default_corpus() -> str:
    """The local WikiText-2 test split if found (:mod:`shift_edit.files.data_files`), else WikiText-103 train via
    ``datasets``."""
    local = find_data("wikitext")
    if local is None:
        log.warning("no local WikiText (run `shift-edit data fetch wikitext` or set SHIFT_EDIT_DATA); "
                    "statistics will read %s through datasets", HF_DEFAULT_CORPUS)
    return str(local) if local is not None else HF_DEFAULT_CORPUS


@dataclass
class Corpus:
    """A stream of texts plus a stable identity for cache keys."""

    name: str
    identity: str  # sha256 of a file, or a datasets fingerprint
    kind: str  # "file" or "datasets"
    path: Path | None = None
    dataset: Any = None
    text_field: str = "text"

    def texts(self) -> Iterator[str]:
        """Non-blank texts in corpus order."""
        if self.kind == "file":
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        yield line
        else:
            for row in self.dataset:
                text = str(row[self.text_field]).strip()
                if text:
                    yield text


def open_corpus(spec: str | None = None) -> Corpus:
    """Resolve a corpus: a local text file (one text per non-blank line) or
    ``hf:<dataset>[/<config>][/<split>]`` loaded with ``datasets`` (needs it installed, and
    internet unless cached). ``None`` means :func:`default_corpus`.
    """
    spec = spec or default_corpus()
    if spec.startswith("hf:"):
        parts = spec[3:].split("/")
        if not parts[0]:
            raise ShiftEditError(f"corpus {spec!r}: expected hf:<dataset>[/<config>][/<split>]")
        name, config, split = (
            parts[0],
            (parts[1] if len(parts) > 1 else None),
            (parts[2] if len(parts) > 2 else "train"),
        )
        try:
            import datasets
        except ImportError:
            raise ShiftEditError("corpus from the hub needs `pip install datasets`") from None
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # noqa: BLE001 - many failure types (network, missing config)
            raise ShiftEditError(f"cannot load corpus {spec!r}: {exc}") from exc
        return Corpus(spec, str(getattr(ds, "_fingerprint", spec)), "datasets", dataset=ds)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ShiftEditError(
            f"corpus {spec!r} is neither a text file nor hf:<dataset>[/<config>][/<split>]"
        )
    return Corpus(path.name, file_sha256(path), "file", path=path.resolve())


# --- computation --------------------------------------------------------------------------
def token_batches(tok, corpus: Corpus, n_tokens: int, max_length: int, batch_tokens: int) -> Iterator[list[list[int]]]:
    """Token-id lists (each truncated to ``max_length``) grouped to about ``batch_tokens``
    tokens; the total is exactly ``n_tokens`` (the last text is cut) unless the corpus ends."""
    remaining = n_tokens
    batch: list[list[int]] = []
    size = 0
    for text in corpus.texts():
        ids = list(tok(text, truncation=True, max_length=max_length).input_ids)[:max_length]
        ids = ids[:remaining]
        if not ids:
            continue
        batch.append(ids)
        size += len(ids)
        remaining -= len(ids)
        if size >= batch_tokens or remaining == 0:
            yield batch
            batch, size = [], 0
        if remaining == 0:
            return
    if batch:
        yield batch
