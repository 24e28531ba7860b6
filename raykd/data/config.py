"""What the data half of a job reads and how it packs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from raykd.errors import ConfigError
from raykd.fields import doc, required


@dataclass
class DataConfig:
    """Source text, tokenised with the teacher's tokenizer and packed to fixed length."""

    source: str | list[str] = required(
        "Files to read: paths or glob patterns, local, s3://bucket/prefix/*.parquet "
        "(add ?endpoint_override=HOST:PORT&scheme=http for S3-compatible stores), or "
        "pkg://DISTRIBUTION/path/inside/it for data that ships in a Python package."
    )
    format: Literal["auto", "text", "jsonl", "parquet"] = doc(
        "auto", "File format; auto picks by extension (.txt/.md text, .jsonl/.json, .parquet)."
    )
    text_key: str = doc("text", "Column (parquet) or field (jsonl) that holds the text.")
    seq_len: int = doc(512, "Tokens per packed training sequence.")
    eval_fraction: float = doc(
        0.01, "Share of sequences held out for evaluation, chosen by a hash of sample_id."
    )
    eval_max_samples: int = doc(
        256, "At most this many held-out sequences are evaluated (the lowest sample_ids)."
    )
    max_files: int | None = doc(None, "Read only the first N files (sorted); null reads all.")
    shuffle: bool = doc(
        True, "Train on the sequences in a seeded random order (run.seed) instead of file "
        "order: the first epoch shuffles the packed token ids of the whole split before the "
        "teacher sees them; later epochs read the label cache's shards in another seeded "
        "order, rows shuffled across the shards of a window of up to 64 MiB, so no epoch "
        "repeats the first one's batches (without a cache they reshuffle the ids), "
        "and share that order. Seeded, not replayed exactly: Ray Data interleaves "
        "parallel reads as they finish."
    )

    def validate(self) -> None:
        sources = [self.source] if isinstance(self.source, str) else self.source
        if not sources or any(not s for s in sources):
            raise ConfigError("source", "must name at least one file or pattern")
        if self.seq_len < 2:
            raise ConfigError("seq_len", f"must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.eval_max_samples < 0:
            raise ConfigError("eval_max_samples", f"must be >= 0, got {self.eval_max_samples}")
        if self.max_files is not None and self.max_files < 1:
            raise ConfigError("max_files", f"must be >= 1, got {self.max_files}")

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)
