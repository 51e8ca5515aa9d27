"""Generate tiny random-weight MLX models that `mlx_lm` and `mlx_lm.server` load in about a second.

A pair made here is a real main/draft pair: the draft is the main model with noise added to its
weights, so at temperature 0 it agrees with the main model on some tokens and not on others, which
exercises both the accept and the reject paths of speculative decoding. Both share one tokenizer.

Run as a program to write a pair into a directory:

    python -m app.testing.tiny_model OUTPUT_DIR [--noise 0.02] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlx.core as mx

# A Qwen2-style chat template: the same shape as the real models the project serves.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Training text for the tokenizer: enough variety that ordinary English, code and punctuation
# tokenize into a few hundred merged tokens rather than raw bytes.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
    "import os\nimport sys\n\nclass Example:\n    def __init__(self, value: int) -> None:\n"
    "        self.value = value\n",
    "Hello! How can I help you today? Tell me a story about a robot who learns to paint.",
    "for i in range(10):\n    print(i * i)\n# comments explain why, not what\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols {} [] () <> = + - * / % & | ^ ~ ! ? . , ; : ' \"",
    "user system assistant: continue the conversation; answer briefly and precisely.",
]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model; defaults give a ~70k-parameter qwen2 that generates ~1000 tok/s."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 4096


def write_tokenizer(directory: Path, vocab_size: int) -> int:
    """Train a byte-level BPE tokenizer on a fixed corpus and write it; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return int(tokenizer.get_vocab_size())


def write_model(
    directory: Path,
    spec: TinyModelSpec = TinyModelSpec(),
    seed: int = 0,
    noise: float = 0.0,
    noise_seed: int = 1,
) -> Path:
    """Write a tiny qwen2 model (weights, config, tokenizer) to `directory` and return it.

    The weights depend only on `seed`; `noise` > 0 adds Gaussian noise of that standard
    deviation (drawn from `noise_seed`), which is how a draft model is derived from a main model.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(directory, spec.vocab_size)
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
    }
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))  # type: ignore[no-untyped-call]
    weights = dict(tree_flatten(model.parameters()))
    weights["lm_head.weight"] = _successor_head(weights["model.embed_tokens.weight"], seed)
    if noise > 0:
        keys = mx.random.split(mx.random.key(noise_seed), len(weights))
        for key, name in zip(keys, sorted(weights), strict=True):
            weights[name] = weights[name] + noise * mx.random.normal(weights[name].shape, key=key)
    mx.eval(weights)
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    # The index real checkpoints carry: mlx_lm's pipeline-parallel loading reads it (`sharded_load`).
    index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in sorted(weights)}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _successor_head(embeddings: mx.array, seed: int) -> mx.array:
    """An output head that maps each token to a fixed random successor.

    Random transformers collapse into repeating one token, which tests nothing. With the
    head's row for token `perm[i]` equal to token i's embedding, the residual stream of token i
    scores `perm[i]` highest, so greedy text walks a long random cycle through the vocabulary,
    while attention and MLP outputs bend it with context. The special tokens are never a
    successor, so generation runs until `max_tokens` unless a stop sequence ends it.
    """
    import mlx.core as mx
    import numpy as np

    vocab = embeddings.shape[0]
    rng = np.random.default_rng(seed)
    ordinary = np.arange(len(SPECIAL_TOKENS), vocab)
    successor = rng.permutation(ordinary)
    head = np.zeros_like(np.array(embeddings))
    source = np.array(embeddings)
    # Row `successor[j]` of the head is the embedding of the j-th ordinary token.
    head[successor] = source[ordinary] * 4.0
    # Special-token rows stay zero and lose to any positive score.
    return mx.array(head)


def write_pair(root: Path, noise: float = 0.02, seed: int = 0) -> tuple[Path, Path]:
    """Write `root/main` and `root/draft` (main plus noise) and return their paths."""
    main = write_model(root / "main", seed=seed)
    draft = write_model(root / "draft", seed=seed, noise=noise, noise_seed=seed + 1)
    return main, draft


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight main/draft model pair.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--noise", type=float, default=0.02, help="std of the noise added for the draft")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main_dir, draft_dir = write_pair(args.output, noise=args.noise, seed=args.seed)
    print(f"main:  {main_dir}\ndraft: {draft_dir}")


if __name__ == "__main__":
    main()
