"""The CounterFact benchmark: data, metrics (ROME, strict top-1, KL), generation (n-gram entropy), WILD-style free
generation, perplexity, runner, summaries."""

from .bench_config import NO_EDIT, BenchConfig
from .counterfact import CounterFactCase, download_counterfact, file_sha256, load_counterfact, parse_case
from .generation import generate_topk, ngram_entropy, text_ngram_entropy
from .metrics import metrics_from_scores, score_case
from .run_dirs import choose_run_dir
from .runner import run_bench
from .sequential import SequentialConfig, run_sequential
from .summarize import load_reference, summarize_run, to_csv, to_markdown
from .wikitext import PerplexityProtocol, perplexity, read_wikitext_lines
from .wild import appears_first, greedy_continuations, wild_metrics, wild_prompts

__all__ = [
    "NO_EDIT", "BenchConfig", "SequentialConfig", "run_sequential", "CounterFactCase", "PerplexityProtocol",
    "choose_run_dir", "download_counterfact",
    "file_sha256", "generate_topk", "load_counterfact", "load_reference", "metrics_from_scores", "ngram_entropy",
    "parse_case", "perplexity", "read_wikitext_lines", "run_bench", "score_case", "summarize_run",
    "text_ngram_entropy", "to_csv", "to_markdown", "appears_first", "greedy_continuations", "wild_metrics",
    "wild_prompts",
]
