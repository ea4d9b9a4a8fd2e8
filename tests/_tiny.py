"""Tiny offline models and a byte-level tokenizer for tests (no network, no hub)."""

from __future__ import annotations

import dataclasses
import functools

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

VOCAB = 260  # 256 byte tokens + specials


@functools.lru_cache(maxsize=None)
def byte_tokenizer() -> T.PreTrainedTokenizerFast:
    """GPT-2-style byte-level tokenizer with no merges: every byte is a token, ' a' != 'a'."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    return tok


_COMMON = dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=256, pad_token_id=256)
_LLAMA = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=48)

#: model_type -> a tiny config. Tests are parametrized over the architecture table and
#: fail if an entry has no tiny config here.
TINY_CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=128, **_COMMON),
    "gpt_neo": lambda: T.GPTNeoConfig(num_layers=3, hidden_size=32, num_heads=2, max_position_embeddings=128,
                                      attention_types=[[["global", "local"], 1], [["global"], 1]], **_COMMON),
    "gptj": lambda: T.GPTJConfig(n_layer=3, n_embd=32, n_head=2, n_positions=128, rotary_dim=8, **_COMMON),
    "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                        intermediate_size=48, **_COMMON),
    "bloom": lambda: T.BloomConfig(n_layer=3, hidden_size=32, n_head=2, **_COMMON),
    "falcon": lambda: T.FalconConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, **_COMMON),
    "opt": lambda: T.OPTConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, ffn_dim=48,
                               word_embed_proj_dim=32, max_position_embeddings=128, **_COMMON),
    "phi": lambda: T.PhiConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                               **_COMMON),
    "phi3": lambda: T.Phi3Config(**_LLAMA, **_COMMON),
    "llama": lambda: T.LlamaConfig(**_LLAMA, **_COMMON),
    "mistral": lambda: T.MistralConfig(**_LLAMA, **_COMMON),
    "qwen2": lambda: T.Qwen2Config(**_LLAMA, **_COMMON),
    "qwen3": lambda: T.Qwen3Config(**_LLAMA, head_dim=16, **_COMMON),
    "gemma": lambda: T.GemmaConfig(**_LLAMA, head_dim=16, **_COMMON),
    "gemma2": lambda: T.Gemma2Config(**_LLAMA, head_dim=16, **_COMMON),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_LLAMA, head_dim=16, **_COMMON),
}


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of ``model_type`` in eval mode (fp32)."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]())
    model.config._name_or_path = f"tiny-{model_type}"
    return model.eval()


#: the tiny statistics corpus (ROME/MEMIT/AlphaEdit/SHIFT_PLUS covariances); conftest's ``corpus`` writes it
CORPUS_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Lionel Messi plays football for a club.",
    "A short line.",
    "Water boils at one hundred degrees Celsius at sea level.",
]


def write_corpus(path) -> str:
    """Write :data:`CORPUS_TEXTS` as a blank-line separated text file; returns its path as a string."""
    path.write_text("\n\n".join(CORPUS_TEXTS) + "\n")
    return str(path)


#: values for required fields, and settings that keep every algorithm cheap on a 3-layer tiny model
REQUIRED = {"layers": [1], "eta": 5.0, "lr": 0.05, "norm_constraint": 0.05}
# max_relative_norm None: tiny random weights are small, so these steps exceed the edit guard's default bound;
# margin 0: tiny random models' logit margins saturate near 0.4 (SHIFT_PLUS / SHIFT_NEURON aim at a margin;
# 0 = the target is the argmax)
CHEAP = {"skip_if_predicted": False, "margin": 0.0, "v_num_grad_steps": 3, "context_template_length_params": [[3, 2]],
         "mom2_n_tokens": 100, "mom2_max_length": 40, "steps": 3, "zstar_cache": False, "max_relative_norm": None}


def tiny_hparams(alg: str, corpus: str, **kw):
    """Hparams of any registered algorithm for a 3-layer tiny model: required fields from
    REQUIRED, else from the algorithm's shipped SmolLM2 hparams; cheap settings where they exist."""
    from shift_edit.core.registry import get_algorithm, load_hparams

    spec = get_algorithm(alg)
    fields = {f.name: f for f in dataclasses.fields(spec.hparams_class)}
    values = {k: v for k, v in {**REQUIRED, **CHEAP, "mom2_corpus": corpus, **kw}.items() if k in fields}
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        shipped = load_hparams(spec.shipped_hparams("smollm2-135m"))
        values.update({n: getattr(shipped, n) for n in missing})
    return spec.hparams_class(**values)
