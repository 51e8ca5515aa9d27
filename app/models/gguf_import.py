"""Turn a GGUF file into a model directory that `mlx_lm.load` reads, inside the model store.

The file is memory-mapped by gguf's reader; each tensor is dequantized in row chunks with
`gguf.quants.dequantize` (every quant type it knows, K-quants included) and streamed into
safetensors shards, so memory stays near one chunk plus the largest llama q/k tensor.

What has to be undone from llama.cpp's conversion (see docs/architecture.md, model sources):
tensor names, dimension order (GGUF lists the innermost dimension first; the reader already
gives NumPy order), and for `llama` the rotary row permutation of q and k.

Why by hand: nothing the project installs turns a GGUF into a model directory without PyTorch. mlx_lm
writes GGUF but cannot read one into a model; `mlx.core.load` reads GGUF but keeps only Q4_0, Q4_1 and
Q8_0 (on mlx 0.32.4 a Q5_0 tensor, as in the catalog's Qwen2.5-Coder-0.5B, fails with "[load_gguf]
gguf_tensor_to_f16 failed"); transformers' GGUF loader imports torch, a large dependency for a gateway
whose backends run MLX, and dequantizes every tensor into memory at once. llama.cpp's own `gguf` package
dequantizes every quant type to NumPy, so this importer needs only it and numpy, one chunk at a time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.models.errors import GGUFImportError, UnsupportedModel
from app.models.gguf_tokenizer import eos_token_ids, write_tokenizer_files
from app.models.safetensors_stream import NonFiniteError, ShardedWriter, TensorSpec
from app.models.store import DEFAULT_DTYPE, DTYPES, Manifest, ModelStore

# float32 elements per dequantized chunk (64 MB): bounds memory for the large embedding matrices.
_CHUNK_ELEMENTS = 16 * 1024 * 1024
_PROGRESS_SECONDS = 2.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_class: str
    permute_qk: bool  # llama.cpp permutes q/k rows for `llama` only
    qkv_bias: bool  # tensors every layer must have


ARCHITECTURES = {
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", permute_qk=False, qkv_bias=True),
    "llama": Architecture("llama", "LlamaForCausalLM", permute_qk=True, qkv_bias=False),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


@dataclass(frozen=True)
class PlannedTensor:
    source: Any  # gguf.ReaderTensor
    name: str  # mlx_lm / Hugging Face name
    shape: tuple[int, ...]
    unpermute_heads: int | None  # llama q/k: heads to undo llama.cpp's rotary permutation over


@dataclass(frozen=True)
class GGUFModel:
    """An opened, validated GGUF file: metadata decoded, tensors memory-mapped."""

    path: Path
    reader: Any  # gguf.GGUFReader
    meta: dict[str, Any]
    architecture: Architecture

    def arch_key(self, key: str, default: Any = None) -> Any:
        value = self.meta.get(f"{self.architecture.name}.{key}", default)
        if value is None:
            raise GGUFImportError(f"{self.path}: metadata {self.architecture.name}.{key} is missing")
        return value


def open_gguf(path: Path) -> GGUFModel:
    """Open `path`; raise GGUFImportError (not a GGUF, truncated) or UnsupportedModel (architecture)."""
    import gguf

    _check_magic(path)
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as error:  # the reader raises ValueError, IndexError, struct errors... on bad bytes
        raise GGUFImportError(f"{path}: corrupt or truncated GGUF file ({error})") from error
    _check_extent(path, reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(
            f"{path}: architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return GGUFModel(path, reader, meta, ARCHITECTURES[str(arch)])


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise GGUFImportError(f"cannot read {path}: {error.strerror}") from error
    if magic != b"GGUF":
        raise GGUFImportError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def _check_extent(path: Path, reader: Any) -> None:
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise GGUFImportError(f"{path}: truncated: tensor data needs {end} bytes, the file has {size}")


def hf_name(gguf_name: str) -> str | None:
    """The mlx_lm name for a GGUF tensor name, or None when there is no counterpart."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def plan_tensors(model: GGUFModel) -> list[PlannedTensor]:
    """Every tensor of the file with its target name and shape, in file order; checks completeness."""
    heads = int(model.arch_key("attention.head_count"))
    kv_heads = int(model.arch_key("attention.head_count_kv", heads))
    planned = []
    for tensor in model.reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise UnsupportedModel(_unsupported_tensor(model, tensor.name))
        unpermute = None
        if model.architecture.permute_qk and ".self_attn.q_proj." in name:
            unpermute = heads
        elif model.architecture.permute_qk and ".self_attn.k_proj." in name:
            unpermute = kv_heads
        shape = tuple(int(d) for d in reversed(tensor.shape))
        planned.append(PlannedTensor(tensor, name, shape, unpermute))
    _check_complete(model, {p.name for p in planned})
    return planned


def _unsupported_tensor(model: GGUFModel, name: str) -> str:
    if name == "rope_freqs.weight":
        return f"{model.path}: per-frequency rope scaling (rope_freqs, Llama 3.1 style) is not supported"
    return f"{model.path}: tensor {name!r} has no counterpart in mlx_lm's {model.architecture.name} model"


def _check_complete(model: GGUFModel, names: set[str]) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    layer_parts = [f"{part}.weight" for part in _LAYER_NAMES.values()]
    if model.architecture.qkv_bias:
        layer_parts += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    for layer in range(int(model.arch_key("block_count"))):
        required += [f"model.layers.{layer}.{part}" for part in layer_parts]
    missing = [name for name in required if name not in names]
    if missing:
        raise GGUFImportError(
            f"{model.path}: {len(missing)} tensors missing (first: {missing[0]}); "
            f"the file is incomplete or not a {model.architecture.name} model"
        )


def model_config(model: GGUFModel, planned: list[PlannedTensor], dtype: str) -> dict[str, Any]:
    """config.json for mlx_lm's `qwen2` / `llama` model classes."""
    hidden = int(model.arch_key("embedding_length"))
    heads = int(model.arch_key("attention.head_count"))
    shapes = {p.name: p.shape for p in planned}
    eos = eos_token_ids(model.meta)
    config: dict[str, Any] = {
        "model_type": model.architecture.name,
        "architectures": [model.architecture.hf_class],
        "hidden_size": hidden,
        "num_hidden_layers": int(model.arch_key("block_count")),
        "intermediate_size": int(model.arch_key("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(model.arch_key("attention.head_count_kv", heads)),
        "rms_norm_eps": float(model.arch_key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(model.arch_key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(model.arch_key("context_length")),
        "vocab_size": shapes["model.embed_tokens.weight"][0],
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "torch_dtype": dtype,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    if model.meta.get("tokenizer.ggml.bos_token_id") is not None:
        config["bos_token_id"] = int(model.meta["tokenizer.ggml.bos_token_id"])
    if model.architecture.name == "llama":
        config["head_dim"] = int(model.arch_key("attention.key_length", hidden // heads))
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in shapes
        config["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in shapes
    scaling = _rope_scaling(model)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _rope_scaling(model: GGUFModel) -> dict[str, Any] | None:
    kind = model.meta.get(f"{model.architecture.name}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = float(model.arch_key("rope.scaling.factor"))
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        original = int(model.arch_key("rope.scaling.original_context_length"))
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise UnsupportedModel(f"{model.path}: rope scaling {kind!r} is not supported")


def unpermute_rows(weight: np.ndarray[Any, Any], heads: int) -> np.ndarray[Any, Any]:
    """Undo llama.cpp's `permute(w, n_head)` (convert_hf_to_gguf.py, LlamaModel).

    Hugging Face keeps each head's rows as two halves (rotate_half); llama.cpp interleaves them
    into pairs with reshape(heads, 2, d/2).swapaxes(1, 2). The inverse reshapes to (heads, d/2, 2)
    and swaps back. The forward permutation is not its own inverse for d/2 > 2.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _chunks(tensor: PlannedTensor) -> Iterator[np.ndarray[Any, Any]]:
    from gguf.quants import dequantize

    source = tensor.source
    if tensor.unpermute_heads is not None or len(tensor.shape) == 1:
        whole = dequantize(source.data, source.tensor_type).reshape(tensor.shape)
        yield whole if tensor.unpermute_heads is None else unpermute_rows(whole, tensor.unpermute_heads)
        return
    data = source.data.reshape(-1, source.data.shape[-1])
    columns = tensor.shape[-1]
    step = max(1, _CHUNK_ELEMENTS // columns)
    for start in range(0, data.shape[0], step):
        yield dequantize(data[start : start + step], source.tensor_type).reshape(-1, columns)


def import_gguf(
    path: Path,
    store: ModelStore,
    name: str,
    *,
    dtype: str = DEFAULT_DTYPE,
    source: str | None = None,
    progress: Progress = lambda _: None,
    replace: bool = False,
    sha256: str | None = None,
) -> Path:
    """Import the GGUF at `path` into `store` as model `name`; return the model's directory."""
    with store.lock(name):
        return import_gguf_locked(
            path, store, name, dtype=dtype, source=source, progress=progress, replace=replace, sha256=sha256
        )


def import_gguf_locked(
    path: Path,
    store: ModelStore,
    name: str,
    *,
    dtype: str = DEFAULT_DTYPE,
    source: str | None = None,
    progress: Progress = lambda _: None,
    replace: bool = False,
    sha256: str | None = None,
) -> Path:
    """`import_gguf` for a caller that already holds the store lock for `name`."""
    if dtype not in DTYPES:
        raise GGUFImportError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    path = path.expanduser().resolve()
    if store.model_dir(name).exists() and not replace:
        raise GGUFImportError(f"model {name!r} already exists in {store.root}; pass --force to replace it")
    model = open_gguf(path)
    planned = plan_tensors(model)
    config = model_config(model, planned, dtype)
    stat = path.stat()
    manifest = Manifest(
        name=name,
        source=source or f"gguf:{path}",
        architecture=model.architecture.name,
        dtype=dtype,
        parameters=sum(math.prod(p.shape) for p in planned),
        gguf_sha256=sha256,
        gguf_size=stat.st_size,
        gguf_mtime_ns=stat.st_mtime_ns,
    )
    started = time.monotonic()
    progress(
        f"importing {path.name}: {model.architecture.name}, {len(planned)} tensors, "
        f"{_mb(stat.st_size)} -> {dtype} into {store.model_dir(name)}"
    )
    with store.staging(name, replace=replace) as work:
        (work / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer_files(model.meta, work, config["max_position_embeddings"])
        written = _write_weights(model, planned, work, dtype, progress)
        (work / "specgate.json").write_text(manifest.to_json())
    progress(f"imported {name}: {_mb(written)} of weights in {time.monotonic() - started:.1f} s")
    return store.model_dir(name)


def _write_weights(
    model: GGUFModel, planned: list[PlannedTensor], directory: Path, dtype: str, progress: Progress
) -> int:
    writer = ShardedWriter(directory, [TensorSpec(p.name, p.shape) for p in planned], dtype)
    total_in = sum(int(p.source.n_bytes) for p in planned)
    done_in = written = 0
    last_report = time.monotonic()
    try:
        for index, tensor in enumerate(planned, start=1):
            try:
                written += writer.write(tensor.name, tensor.shape, _chunks(tensor))
            except NonFiniteError as error:
                raise GGUFImportError(
                    f"{model.path}: tensor {tensor.source.name}: {error}; the file is corrupt"
                    + (", or its values exceed float16's range (try --dtype float32)" if dtype == "float16" else "")
                ) from error
            except NotImplementedError as error:
                raise UnsupportedModel(f"{model.path}: tensor {tensor.source.name}: {error}") from error
            done_in += int(tensor.source.n_bytes)
            if time.monotonic() - last_report >= _PROGRESS_SECONDS or index == len(planned):
                last_report = time.monotonic()
                progress(f"  tensor {index}/{len(planned)} ({_mb(done_in)} of {_mb(total_in)} read)")
        writer.close()
    finally:
        writer.abort()
    return written


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"
