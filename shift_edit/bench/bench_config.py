"""What a ``shift-edit bench`` run computes (:class:`BenchConfig`) and the protocol it records in ``params.json``
(the run folder whose recorded protocol matches is resumed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.errors import ShiftEditError
from ..core.hparams import HyperParams
from .wikitext import PerplexityProtocol
from .wild import DEFAULT_MAX_NEW_TOKENS
from .wild import protocol as wild_protocol

PORTABILITY_FAMILY = ("EasyEdit token accuracy of the record's portability answer ('New Answer') after its "
                      "question ('New Question'), as compute_edit_quality scores portability; only records that have "
                      "one")


#: the algorithm name of the unedited model's row
NO_EDIT = "NONE"


PROTOCOL_VERSION = 1


@dataclass
class BenchConfig:
    """What a benchmark run computes (all of it goes into ``params.json``).

    ``score_records``: records whose passes on the unedited model share batches (:mod:`.packing`; 1: each
    record alone, the reference path); like ``batch_size`` it changes the float round-off only, not the protocol.
    ``skip_wild`` / ``wild_max_new_tokens`` / ``wild_neighborhood`` / ``wild_records``: the WILD-style
    free-generation family (:mod:`.wild`): off, greedy new tokens per prompt, neighborhood prompts too,
    records per decoding batch. ``portability``: the ``easyedit_portability`` family on the records that
    carry EasyEdit's ``portability`` question (``New Question`` / ``New Answer``).
    """

    alg: str
    hparams: HyperParams | None
    seed: int = 0
    skip_generation: bool = False
    gen_max_length: int = 100
    gen_top_k: int = 5
    gen_records: int = 4
    gen_every: int = 1
    ppl_every: int = 0
    ppl_protocol: PerplexityProtocol = field(default_factory=PerplexityProtocol)
    wikitext: str | None = None
    batch_size: int = 64
    score_records: int = 16
    neighborhood_kl: bool = True
    num_edits: int = 1
    skip_wild: bool = False
    wild_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    wild_neighborhood: bool = False
    wild_records: int = 8
    portability: bool = False

    def __post_init__(self) -> None:
        if self.wild_max_new_tokens < 1:
            raise ShiftEditError(f"--wild-max-new-tokens must be >= 1, got {self.wild_max_new_tokens}")
        if self.score_records < 1:
            raise ShiftEditError(f"--score-records must be >= 1, got {self.score_records}")
        if self.wild_records < 1:
            raise ShiftEditError(f"--wild-records must be >= 1, got {self.wild_records}")

    def protocol(self) -> dict[str, Any]:
        out = {
            "version": PROTOCOL_VERSION,
            "metric_families": {
                "rome": "ES/PS/NS from mean token NLLs of target_new vs target_true (teacher forcing); "
                "magnitudes EM/PM/NM = mean p(new)-p(true) (neighborhood: p(true)-p(new)), p = exp(-mean NLL)",
                "top1": "strict top-1: every token of the correct object is the argmax (neighborhood: TRUE object)",
                "top1_first": "first-token-only top-1 (same correct objects)",
                "neighborhood_kl": None if not self.neighborhood_kl else "KL(unedited || edited) of next-token "
                "distributions after neighborhood prompts, nats",
                "generation": None if self.skip_generation else
                "ROME n-gram entropy: top-k sampling, total length, mean(2/3 H2, 4/3 H3) bits, words from nltk's "
                "NLTKWordTokenizer (word_tokenize without punkt)",
                "perplexity": None if not self.ppl_every else self.ppl_protocol.to_dict(),
            },
            "generation": None if self.skip_generation else {
                "top_k": self.gen_top_k, "max_length": self.gen_max_length,
                "records_per_decoding_batch": self.gen_records,
                "every_kth_record": self.gen_every,
                "how": "each record's edit is added to its own rows' module outputs (y += x ΔWᵀ) by hooks, "
                       "so several records share one decoding batch; each record samples from its own seed",
            },
            "ppl_every": self.ppl_every,
            "wikitext": self.wikitext if self.ppl_every else None,
            "edit_mode": "one edit at a time, undone bit-exactly before the next" if self.num_edits == 1 else
            f"{self.num_edits} consecutive records' requests applied at once (MEMIT protocol), every record of "
            "the batch evaluated on that model, then undone bit-exactly",
            "num_edits": self.num_edits,
        }
        if self.portability:  # absent when off, as the WILD family: earlier runs still match
            out["metric_families"]["easyedit_portability"] = PORTABILITY_FAMILY
        if not self.skip_wild:  # absent (not None) when off: runs made before the family existed still match
            out["metric_families"]["wild"] = wild_protocol(self.wild_max_new_tokens, self.wild_neighborhood)
            out["wild"] = {"max_new_tokens": self.wild_max_new_tokens, "neighborhood": self.wild_neighborhood,
                           "records_per_decoding_batch": self.wild_records,
                           "how": "after the undo, each record's edit is added to its own rows' module outputs by "
                                  "hooks (as for the n-gram entropy), so several records share one decoding batch"}
        return out
