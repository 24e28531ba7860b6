"""The soft-label cache: label once, train many.

    <cache>/lineage.json              what every shard was labelled with (written first)
    <cache>/shards/part-<uuid>.parquet  one teacher batch each: sequence + label columns
    <cache>/eval/eval-<digest>.parquet  the labelled held-out set of a job
    <cache>/manifest.json             shards and sample count after a complete pass

A shard appears under its final name only once fully written (temporary name, then a
move), so a cache left behind by a crash holds only complete shards; their samples are
used and the rest labelled again. Every shard carries its lineage in its parquet metadata
and a reader refuses shards, or a whole cache, whose lineage differs from the job's.

Plain pyarrow, no Ray: the runner wires `ShardWriter` into the Ray Data pipeline and reads
shards back through `raykd.data.cache_source`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raykd import storage
from raykd.data.samples import SampleSet
from raykd.errors import ConfigError, UserError

LINEAGE_KEY = b"raykd.lineage"
SHAPES_KEY = b"raykd.shapes"
_HEAD_TAIL = 1 << 20  # bytes hashed at each end of a weight or data file


@dataclass(frozen=True)
class Lineage:
    """Everything that determines a soft label. Two jobs share labels iff these match."""

    teacher: str  # fingerprint of the teacher's config and weights
    tokenizer: str  # fingerprint of the tokenizer files
    dataset: str  # fingerprint of the source files and how they are read
    seq_len: int
    top_k: int
    temperature: float
    encoding: str
    dtype: str  # teacher inference dtype
    vocab_limit: int | None  # logits cut to this many tokens (student.vocab: truncate)
    # Fields added later, with defaults: left out of the key and the JSON while at their
    # default, so caches written before them keep their keys and stay readable.
    tail_samples: int = 0

    def key(self) -> str:
        return _digest(self.to_json().encode())[:16]

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING and values[f.name] == f.default:
                del values[f.name]
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Lineage:
        data = json.loads(text)
        return cls(**{f.name: data.get(f.name, None if f.default is dataclasses.MISSING
                                       else f.default) for f in dataclasses.fields(cls)})

    def differences(self, other: Lineage) -> list[str]:
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


# --------------------------------------------------------------------------- fingerprints


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_fingerprint(fs: pafs.FileSystem, path: str) -> str:
    """Size plus the first and last MiB: cheap on any store, and changes whenever a
    weight or data file is replaced."""
    info = fs.get_file_info(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(info.size).encode())
    with fs.open_input_file(path) as f:
        h.update(f.read(_HEAD_TAIL))
        if info.size > 2 * _HEAD_TAIL:
            f.seek(info.size - _HEAD_TAIL)
            h.update(f.read(_HEAD_TAIL))
    return h.hexdigest()


def dataset_fingerprint(files: storage.FileSet, fmt: str, text_key: str) -> str:
    with ThreadPoolExecutor(8) as pool:
        prints = list(pool.map(lambda p: file_fingerprint(files.fs, p), files.paths))
    parts = [f"{fmt}|{text_key}"] + [f"{n}|{p}" for n, p in zip(files.names, prints)]
    return _digest("\n".join(parts).encode())


def model_fingerprint(model_path: str) -> str:
    """Fingerprint of a .gguf file or a Hugging Face directory (config + weight files)."""
    fs = pafs.LocalFileSystem()
    info = fs.get_file_info(model_path)
    if info.type == pafs.FileType.File:
        return file_fingerprint(fs, model_path)
    entries = sorted(fs.get_file_info(pafs.FileSelector(model_path)), key=lambda i: i.path)
    parts = []
    for e in entries:
        name = e.path.rsplit("/", 1)[-1]
        if name == "config.json":
            parts.append("config|" + _digest(Path(e.path).read_bytes()))
        elif name.endswith((".safetensors", ".bin", ".gguf", ".pt")):
            parts.append(f"{name}|{file_fingerprint(fs, e.path)}")
    return _digest("\n".join(parts).encode())


def tokenizer_fingerprint(model_dir: str) -> str:
    fs = pafs.LocalFileSystem()
    parts = []
    for e in sorted(fs.get_file_info(pafs.FileSelector(model_dir)), key=lambda i: i.path):
        name = e.path.rsplit("/", 1)[-1]
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            parts.append(f"{name}|{_digest(Path(e.path).read_bytes())}")
    return _digest("\n".join(parts).encode())


# --------------------------------------------------------------------------- the cache


class LabelCache:
    """One cache directory (local or s3://) holding labels of exactly one lineage."""

    def __init__(self, uri: str, lineage: Lineage, key: str = "labels.cache"):
        self.uri = uri
        self.lineage = lineage
        self.key = key
        self.fs, self.root = storage.filesystem(uri, key)

    # -- lineage

    def open(self) -> LabelCache:
        """Create the cache or check that the existing one has this job's lineage."""
        path = f"{self.root}/lineage.json"
        try:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                with self.fs.open_input_file(path) as f:
                    existing = Lineage.from_json(f.read())
                self.check(existing, path)
                return self
            self.fs.create_dir(f"{self.root}/shards", recursive=True)
            self._write_atomic(path, self.lineage.to_json().encode())
        except storage.pa_errors() as e:
            raise UserError(f"{self.key}: cannot use {self.uri}: {_first_line(e)}") from None
        return self

    def check(self, other: Lineage, where: str) -> None:
        diff = self.lineage.differences(other)
        if diff:
            field = diff[0]
            raise ConfigError(self.key, f"{where} holds labels made with a different {field} "
                              f"({getattr(other, field)!r}, this job: "
                              f"{getattr(self.lineage, field)!r}); point labels.cache "
                              "elsewhere or use the job that made them")

    # -- shards

    def shard_paths(self) -> list[str]:
        selector = pafs.FileSelector(f"{self.root}/shards", allow_not_found=True)
        return sorted(i.path for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                      and not i.path.rsplit("/", 1)[-1].startswith("."))

    def index(self) -> CacheIndex:
        """Which samples (dense sample_index) the complete shards hold."""
        paths = self.shard_paths()
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(self._shard_ids, paths))
        return CacheIndex(paths, ids)

    def _shard_ids(self, path: str) -> np.ndarray:
        with self.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            if LINEAGE_KEY not in meta:
                raise UserError(f"{self.key}: {path} is not a raykd label shard")
            self.check(Lineage.from_json(meta[LINEAGE_KEY]), path)
            return pf.read(columns=["sample_index"]).column(0).to_numpy()

    def write_shard(self, batch: dict[str, np.ndarray]) -> str:
        name = f"part-{uuid.uuid4().hex}.parquet"
        data = table_bytes(batch, self.lineage)
        self._write_atomic(f"{self.root}/shards/{name}", data)
        return name

    def read_shard(self, path: str, wanted: SampleSet | None = None) -> dict[str, np.ndarray]:
        """A shard's rows, only those in `wanted` when given, lineage checked."""
        with self.fs.open_input_file(path) as f:
            table = pq.read_table(f)
        self.check(Lineage.from_json((table.schema.metadata or {}).get(LINEAGE_KEY, b"{}")),
                   path)
        rows = None
        if wanted is not None:
            rows = np.nonzero(wanted.contains(table.column("sample_index").to_numpy()))[0]
        return table_to_numpy(table, rows)

    # -- eval set and manifest

    def eval_path(self, sample_index: np.ndarray) -> str:
        return f"{self.root}/eval/eval-{_digest(np.sort(sample_index).tobytes())[:16]}.parquet"

    def read_eval(self, sample_index: np.ndarray) -> dict[str, np.ndarray] | None:
        path = self.eval_path(sample_index)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_file(path) as f:
            table = pq.read_table(f)
        self.check(Lineage.from_json(table.schema.metadata[LINEAGE_KEY]), path)
        return table_to_numpy(table)

    def write_eval(self, rows: dict[str, np.ndarray]) -> None:
        self.fs.create_dir(f"{self.root}/eval", recursive=True)
        self._write_atomic(self.eval_path(rows["sample_index"]), table_bytes(rows, self.lineage))

    def write_manifest(self, index: CacheIndex, samples: int) -> None:
        manifest = {"lineage": json.loads(self.lineage.to_json()),
                    "shards": [p.rsplit("/", 1)[-1] for p in index.paths],
                    "samples": samples, "complete": True}
        self._write_atomic(f"{self.root}/manifest.json",
                           (json.dumps(manifest, indent=1) + "\n").encode())

    def _write_atomic(self, path: str, data: bytes) -> None:
        # Local: write beside, then rename. S3: a PUT is atomic by itself, and a move
        # would be a copy; the object appears whole or not at all.
        if isinstance(self.fs, pafs.LocalFileSystem):
            folder, name = path.rsplit("/", 1)
            tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)


@dataclass
class CacheIndex:
    paths: list[str]
    ids: list[np.ndarray]  # sample_index of each shard's rows

    def cached(self, total: int) -> SampleSet:
        s = SampleSet(total)
        for ids in self.ids:
            s.add(ids)
        return s

    def rows(self) -> int:
        return int(sum(len(i) for i in self.ids))


# --------------------------------------------------------------------------- table format


def table_bytes(batch: dict[str, np.ndarray], lineage: Lineage) -> bytes:
    """Columns -> parquet bytes: n-d columns as (nested-free) fixed-size lists, their
    row shapes and the lineage in the file metadata. zstd level 15: ~2 % smaller than the
    default level on soft labels, and still fast next to a teacher batch (shards are
    ~100 KB-10 MB)."""
    import io

    arrays, shapes = {}, {}
    for name, col in batch.items():
        col = np.ascontiguousarray(col)
        if col.ndim == 1:
            arrays[name] = pa.array(col)
        else:
            per_row = int(np.prod(col.shape[1:]))
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(col.reshape(-1)), per_row)
            shapes[name] = list(col.shape[1:])
    table = pa.table(arrays).replace_schema_metadata({
        LINEAGE_KEY: lineage.to_json().encode(), SHAPES_KEY: json.dumps(shapes).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=15)
    return buf.getvalue()


def table_to_numpy(table: pa.Table, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    if rows is not None:
        table = table.take(pa.array(rows))
    shapes = json.loads((table.schema.metadata or {}).get(SHAPES_KEY, b"{}"))
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if name in shapes:
            flat = col.flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.reshape(len(col), *shapes[name])
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def concat(parts: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = list(parts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
