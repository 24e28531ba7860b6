"""Find, describe and load a model (the teacher, or a pretrained student): a Hugging Face
directory, a hub id, or a GGUF file.

GGUF files are dequantised once per machine into a plain Hugging Face directory under
`$RAYKD_CACHE` (default ~/.cache/raykd): transformers needs ~15-30 s to dequantise a GGUF
and refuses to `save_pretrained` the result, while the converted directory reloads in
well under a second. Every replica and every later run then loads the converted copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.errors import UserError
from raykd.storage import local_path

KEY = "teacher.model"


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a model without loading its weights."""

    model_type: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


def cache_root() -> Path:
    return Path(os.environ.get("RAYKD_CACHE", Path.home() / ".cache" / "raykd"))


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def _resolve(model: str, key: str = KEY) -> tuple[str, str]:
    """-> (kind, location) with kind in {"dir", "gguf", "hub"}."""
    if model.startswith(("pkg://", "file://", "/", ".", "~")) or os.path.exists(model):
        path = local_path(model, key)
        if not os.path.exists(path):
            raise UserError(f"{key}: {model} does not exist")
        if os.path.isfile(path):
            if _is_gguf(path):
                return "gguf", path
            raise UserError(f"{key}: {model} is a file but not a .gguf model; give a "
                            "Hugging Face model directory or a .gguf file")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise UserError(f"{key}: {model} is not a Hugging Face model directory "
                            "(no config.json)")
        return "dir", path
    if model.count("/") == 1 and all(model.split("/")):
        return "hub", model
    raise UserError(f"{key}: {model} is neither a local path nor a hub id (org/name)")


def _gguf_cache_dir(path: str) -> Path:
    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return cache_root() / "models" / f"{Path(path).stem}-{digest}"


def describe(model: str, key: str = KEY) -> ModelInfo:
    """Shape of a model, read from config.json or GGUF metadata (no weights loaded)."""
    kind, where = _resolve(model, key)
    if kind == "gguf":
        cached = _gguf_cache_dir(where)
        if (cached / "config.json").exists():
            return _info_from_config(json.loads((cached / "config.json").read_text()), key)
        return _info_from_gguf(where, key)
    if kind == "dir":
        return _info_from_config(json.loads(Path(where, "config.json").read_text()), key)
    return _info_from_config(_hub_config(where, key), key)


def materialize(model: str, key: str = KEY) -> str:
    """A local Hugging Face directory holding the model (converting/downloading once)."""
    kind, where = _resolve(model, key)
    if kind == "dir":
        return where
    if kind == "hub":
        return _download(where, key)
    target = _gguf_cache_dir(where)
    if (target / "config.json").exists():
        return str(target)
    _convert_gguf(where, target, key)
    return str(target)


def load_model(directory: str, dtype: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    return model.to(device).eval()


def load_weights(directory: str) -> Mapping[str, Any]:
    """The model's tensors by name, each read from its safetensors file only when asked
    for: a student seeded from a few teacher layers reads those layers, not the whole
    teacher (built in fp32 in every train worker, a bf16 teacher cost ~3x its file size in
    memory just to copy a few layers out; docs/benchmarks.md). Other formats (PyTorch
    .bin) load the whole model."""
    index = Path(directory, "model.safetensors.index.json")
    single = Path(directory, "model.safetensors")
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: str(Path(directory, f)) for name, f in weight_map.items()}
    elif single.exists():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            files = dict.fromkeys(f.keys(), str(single))
    else:
        return load_model(directory, "float32", "cpu").state_dict()
    return _SafetensorsWeights(files)


class _SafetensorsWeights(Mapping):
    """Read-only name -> tensor view over safetensors files, loading on access."""

    def __init__(self, files: dict[str, str]):
        self._files = files

    def __getitem__(self, name: str) -> Any:
        from safetensors import safe_open

        with safe_open(self._files[name], "pt") as f:  # mmap: reads this tensor alone
            return f.get_tensor(name)

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor
        return name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _convert_gguf(path: str, target: Path, key: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(path)
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                         dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad files
        raise UserError(f"{key}: cannot load GGUF {path}: {str(e).splitlines()[0]}") from None
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain_config = AutoConfig.for_model(**config)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Atomic publish: a concurrent converter on this node loses the race harmlessly.
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(repo_id: str, key: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all user-facing
        raise UserError(f"{key}: cannot fetch {repo_id} from the Hugging Face hub "
                        f"({type(e).__name__}); give a local directory instead") from None


def _hub_config(repo_id: str, key: str) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{key}: cannot fetch {repo_id} from the Hugging Face hub "
                        f"({type(e).__name__}); give a local directory instead") from None


def _info_from_config(cfg: dict[str, Any], key: str = KEY) -> ModelInfo:
    def pick(*names: str) -> Any:
        for n in names:
            if cfg.get(n) is not None:
                return cfg[n]
        raise UserError(f"{key}: config.json lacks {names[0]}")

    heads = pick("num_attention_heads", "n_head")
    return ModelInfo(
        model_type=str(cfg.get("model_type", "unknown")),
        vocab_size=int(pick("vocab_size")),
        num_layers=int(pick("num_hidden_layers", "n_layer")),
        hidden_size=int(pick("hidden_size", "n_embd")),
        intermediate_size=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 0),
        num_attention_heads=int(heads),
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
    )


def _info_from_gguf(path: str, key: str = KEY) -> ModelInfo:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{key}: {path} is not a readable GGUF file ({e})") from None

    def get(name: str, default: Any = None) -> Any:
        field = reader.fields.get(name)
        return field.contents() if field is not None else default

    arch = get("general.architecture")
    if arch is None:
        raise UserError(f"{key}: {path} has no general.architecture in its GGUF metadata")
    vocab = get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else 0
    heads = int(get(f"{arch}.attention.head_count", 1))
    return ModelInfo(
        model_type=str(arch),
        vocab_size=int(vocab),
        num_layers=int(get(f"{arch}.block_count", 0)),
        hidden_size=int(get(f"{arch}.embedding_length", 0)),
        intermediate_size=int(get(f"{arch}.feed_forward_length", 0)),
        num_attention_heads=heads,
        num_key_value_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
    )
