"""Files -> documents -> tokens -> fixed-length sequences with stable sample ids.

Plain Python, no Ray: the runner maps `PackFiles` over Ray Data file rows. A file is packed
on its own (documents joined by EOS, cut every seq_len tokens), so a sequence's id depends
only on the file's stable name and the sequence's index in it, never on how Ray Data
splits the work. That is what lets a resumed run skip exactly the sequences it trained on.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from raykd.errors import UserError

_SPLIT_BUCKETS = 1_000_000


def sample_id(name: str, index: int) -> int:
    """A 63-bit id for sequence `index` of file `name` (non-negative, fits int64)."""
    digest = hashlib.blake2b(f"{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def is_eval(ids: np.ndarray, eval_fraction: float) -> np.ndarray:
    """Held-out membership from the id's own hash bits: deterministic, no coordination."""
    return (ids % _SPLIT_BUCKETS) < int(round(eval_fraction * _SPLIT_BUCKETS))


def detect_format(name: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    lower = name.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return "text"


def documents(data: bytes, fmt: str, text_key: str, name: str) -> list[str]:
    """The texts in one file."""
    if fmt == "text":
        return [data.decode("utf-8", errors="replace")]
    if fmt == "jsonl":
        docs = []
        for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{name}: line {lineno} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or text_key not in row:
                raise UserError(f"{name}: line {lineno} has no '{text_key}' field (data.text_key)")
            docs.append(str(row[text_key]))
        return docs
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data), columns=[text_key])
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise UserError(f"{name}: cannot read column '{text_key}' (data.text_key): "
                            f"{str(e).splitlines()[0]}") from None
        return [str(t) for t in table.column(text_key).to_pylist() if t is not None]
    raise ValueError(f"unknown format {fmt}")


def pack(token_docs: Iterable[list[int]], seq_len: int, eos_id: int, pad_id: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents (each followed by EOS) and cut every `seq_len` tokens.

    Returns (input_ids (N, seq_len) int32, length (N,) int32). The last piece is
    right-padded with `pad_id`; a piece shorter than 2 tokens has no next-token target
    and is dropped.
    """
    stream: list[int] = []
    for toks in token_docs:
        stream.extend(toks)
        stream.append(eos_id)
    n_full, rest = divmod(len(stream), seq_len)
    n = n_full + (1 if rest >= 2 else 0)
    ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    lengths = np.full((n,), seq_len, dtype=np.int32)
    flat = np.asarray(stream, dtype=np.int32)
    if n_full:
        ids[:n_full] = flat[: n_full * seq_len].reshape(n_full, seq_len)
    if n > n_full:
        ids[n_full, :rest] = flat[n_full * seq_len:]
        lengths[n_full] = rest
    return ids, lengths


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 60  # we cut sequences ourselves; silence the length warning
    return tok


@dataclass
class PackSpec:
    """What PackFiles needs to know about the job and the file list (pickled into tasks)."""

    teacher_model: str
    names: dict[str, str]  # path -> stable name (sample ids hash it)
    file_index: dict[str, int]  # path -> position in the job's file list
    fmt: str
    text_key: str
    seq_len: int
    eval_fraction: float


class PackFiles:
    """Ray Data UDF: rows {bytes, path} of whole files -> packed sequences.

    split "train" / "eval": rows sample_id (int64), sample_index (int64), input_ids
    (seq_len,) int32, length int32 of that split, optionally only those in `keep` (a
    SampleSet or an ObjectRef to one). split "stats": one row per file, file_idx, count
    (sequences it packs into) and eval_bits (its held-out bitmap, packed): what the driver
    needs to number every sequence (see raykd.data.samples).
    """

    def __init__(self, spec: PackSpec, split: str, offsets: np.ndarray | None = None,
                 keep: Any = None):
        if split != "stats" and offsets is None:
            raise ValueError("offsets are needed to number sequences")
        self.spec = spec
        self.split = split
        self.offsets = offsets
        self.keep = keep

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raykd.teacher.loading import materialize

        spec = self.spec
        tok = load_tokenizer(materialize(spec.teacher_model))
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        stats: dict[str, list] = {"file_idx": [], "count": [], "eval_bits": []}
        out: dict[str, list] = {"sample_id": [], "sample_index": [], "input_ids": [], "length": []}
        for data, path in zip(batch["bytes"], batch["path"]):
            path = str(path)
            name = spec.names.get(path, path)
            docs = documents(bytes(data), detect_format(name, spec.fmt), spec.text_key, path)
            token_docs = tok(docs, add_special_tokens=False)["input_ids"] if docs else []
            ids, lengths = pack(token_docs, spec.seq_len, eos, pad)
            sids = np.array([sample_id(name, i) for i in range(len(ids))], dtype=np.int64)
            held = is_eval(sids, spec.eval_fraction)
            f = spec.file_index[path]
            if self.split == "stats":
                stats["file_idx"].append(f)
                stats["count"].append(len(ids))
                stats["eval_bits"].append(np.packbits(held).tobytes())
                continue
            index = self.offsets[f] + np.arange(len(ids), dtype=np.int64)
            keep = held if self.split == "eval" else ~held
            if self.keep is not None:
                keep &= _resolve(self.keep).contains(index)
            out["sample_id"].append(sids[keep])
            out["sample_index"].append(index[keep])
            out["input_ids"].append(ids[keep])
            out["length"].append(lengths[keep])
        if self.split == "stats":
            return {"file_idx": np.asarray(stats["file_idx"], np.int64),
                    "count": np.asarray(stats["count"], np.int64),
                    "eval_bits": np.asarray(stats["eval_bits"], dtype=object)}
        if not out["sample_id"]:
            return empty_sequences(spec.seq_len)
        return {k: np.concatenate(v) for k, v in out.items()}


def _resolve(keep: Any) -> Any:
    """A SampleSet, fetched once per process when it travels as an ObjectRef."""
    from raykd.data.samples import SampleSet

    if isinstance(keep, SampleSet):
        return keep
    return _fetch(keep)


@functools.lru_cache(maxsize=4)
def _fetch(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def empty_sequences(seq_len: int) -> dict[str, np.ndarray]:
    return {
        "sample_id": np.zeros((0,), np.int64),
        "sample_index": np.zeros((0,), np.int64),
        "input_ids": np.zeros((0, seq_len), np.int32),
        "length": np.zeros((0,), np.int32),
    }
