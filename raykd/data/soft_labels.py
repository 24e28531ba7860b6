"""The soft-label columns: the one interface between the teacher half and the student half.

Per token position the teacher keeps its top-k token ids, and enough about their logits to
recover exact tempered probabilities p_i = exp(z_i / T - lse) and so the tail mass outside
the top-k, 1 - sum_i p_i, where lse = logsumexp(z / T) over the *full* vocabulary
(T = `labels.temperature`). Three encodings, chosen by `labels.encoding`:

    exact    topk_ids int32 (L, k), topk_logits float32 (L, k), lse float32 (L,)
             the raw logits and the full-vocabulary log-sum-exp, as the teacher computed them.
    fp16     topk_ids uint16 (int32 past 65,536 tokens) (L, k), topk_logprobs float16 (L, k),
             tail_logprob float16 (L,):  log p_i = z_i / T - lse, log(1 - sum_i p_i).
    compact  topk_id_planes uint8 (L, P, k), topk_q uint8 (L, k), top_logprob float16 (L,),
             tail_logprob float16 (L,): ids sorted ascending and delta-coded, the deltas
             split into P byte planes (P = 2 up to 65,536 tokens);
             q_i = round(255 * (p_i / p_max) ** (1/3)), an error relative to each
             probability. Parquet's zstd squeezes both (sorted deltas and zero high bytes
             compress well): about 130 bytes per token at k = 64 on Shakespeare with
             SmolLM2, everything in the shard included (bench/encodings.py).

With `labels.tail_samples` = m > 0 (64 by default under forward KL), every encoding
also carries m token ids per position drawn from the teacher's tempered distribution
renormalised over the ids outside the top-k, and that distribution's entropy (exact:
int32 / float32; fp16: 16-bit ids / float16; compact: the draws sorted and delta-coded
like the top-k ids):

    tail_ids (L, m) or tail_id_planes uint8 (L, P, m),   tail_entropy (L,)

The loss uses them for the one part of the forward KL that the top-k + tail outcome
leaves out (`raykd.student.losses.sparse_kl`).

The lossy encodings store the tail mass itself rather than leave it to 1 - sum(decoded
p_i): when the teacher is confident the tail is tiny, and a 0.1 % error in the top
probabilities would be a large error in it, which reverse KL weighs by the student's own
tail mass. With it the KD loss from decoded labels stays within ~3e-4 of exact (tested
< 1e-3, forward and reverse, T = 1 and 2, on SmolLM2's labels). The cube root is chosen
over a square root, which saves ~5 bytes per token but let reverse KL drift to 1.6e-3
against a trained 4-layer student.

Every batch also carries the packed sequence and bookkeeping columns:

    sample_id int64 (,)   input_ids int32 (L,)   length int32 (,)   labeled_at float64 (,)
    from_cache int8 (,)   -- training rows: 1 when read from the label cache, 0 from a replica
    teacher_nll float32 (L,) -- eval rows only: the teacher's -log p(next token) at T = 1

The encoding is self-describing: `decode` recognises it from the columns present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from raykd.errors import ConfigError
from raykd.fields import doc

SEQUENCE_COLUMNS = ("sample_id", "input_ids", "length")
ENCODINGS = ("exact", "fp16", "compact")
_Q_MAX = 255.0
_Q_ROOT = 3.0  # q is linear in (p / p_max) ** (1 / _Q_ROOT)


@dataclass
class LabelConfig:
    """What the teacher emits per token, and where labels are cached."""

    top_k: int = doc(64, "Teacher token ids (and probabilities) kept per position.")
    temperature: float = doc(
        1.0, "Softmax temperature T of the distillation term; labels are stored at this T."
    )
    encoding: Literal["exact", "fp16", "compact"] = doc(
        "compact", "Soft-label encoding: exact (int32 ids, fp32 logits + lse), fp16 "
        "(16-bit ids and log-probs) or compact (delta-coded ids, 8-bit probabilities)."
    )
    tail_samples: int | None = doc(
        None, "Token ids drawn per position, with replacement, from the teacher's tempered "
        "distribution outside the top-k (seeded by the sample, so a relabelled sample gets "
        "the same draws). They teach the student the shape of the mass the top-k leave out, "
        "an unbiased estimate of the full-vocabulary forward KL; 0 keeps that mass as one "
        "outcome. null = 64 under loss.kind forward_kl, 0 under reverse_kl (which they "
        "cannot estimate). 64 cost 1.7x the label bytes and 5 % more teacher time, and took "
        "bench.quality's two-epoch student 1.4 and 2.4 % below full-vocabulary KD on two "
        "seeds, where top-64 alone stayed 3.3 and 2.6 % above (docs/benchmarks.md)."
    )
    cache: str | None = doc(
        "auto", "Soft-label cache directory (local or s3://): labels are written through "
        "while they stream, and later epochs and later runs with the same lineage read "
        "them instead of running the teacher. auto = <run.output_dir>/label-cache/<lineage "
        "key>; null disables caching."
    )

    def validate(self) -> None:
        if self.top_k < 1:
            raise ConfigError("top_k", f"must be >= 1, got {self.top_k}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if self.tail_samples is not None and self.tail_samples < 0:
            raise ConfigError("tail_samples", f"must be >= 0, got {self.tail_samples}")


@dataclass
class SoftLabels:
    """Decoded soft labels as torch tensors: the teacher's top-k support, its tempered
    log-probabilities there, and the log of the mass outside (None: derive it as
    1 - sum p). Entry order is unspecified (compact sorts by id). With tail samples: ids
    drawn from the teacher's distribution outside the top-k, and that distribution's
    entropy."""

    topk_ids: Any  # (B, L, k) int64
    log_p: Any  # (B, L, k) float32, log softmax(z / T) at those ids
    log_tail: Any = None  # (B, L) float32 or None
    tail_ids: Any = None  # (B, L, m) int64 or None
    tail_entropy: Any = None  # (B, L) float32 or None, in nats


DEFAULT_TAIL_SAMPLES = 64  # what labels.tail_samples: null means under forward KL


def tail_samples_for(config: LabelConfig, vocab_size: int) -> int:
    """Draws per position: none when the top-k already hold the whole vocabulary. A job
    resolves tail_samples: null (JobConfig.validate); a LabelConfig used on its own
    (benches, tests) draws none unless asked."""
    m = config.tail_samples or 0
    return m if min(config.top_k, vocab_size) < vocab_size else 0


def sample_tail(z: Any, topk_ids: Any, m: int, seeds: Any) -> tuple[Any, Any]:
    """m draws per position from softmax(z) restricted to the ids outside topk_ids.

    z (B, L, V) the tempered logits; topk_ids (B, L, k); seeds (B,) one integer per row,
    the row's sample id: the draws depend only on it and the logits, so a sample labelled
    again after a failure gets the same ones. Returns ids (B, L, m) int64 and the tail
    distribution's entropy (B, L) float32.
    """
    import torch

    draws, entropies = [], []
    seeds = seeds.tolist() if hasattr(seeds, "tolist") else list(seeds)
    # One (L, V) work buffer for all rows: a fresh one per row page-faults in every time.
    q = torch.empty(z.shape[1:], dtype=torch.float32, device=z.device)
    for row_z, row_top, seed in zip(z, topk_ids, seeds):  # a row at a time: 1/B the memory
        row_z = row_z.float()
        # Renormalised within the tail, so a confident teacher's tail never underflows to
        # all zeros. Each pass over (L, V) costs about what the top-k does, so few are
        # made: a copy, a max, an exp in place, a sum, a batched dot and a cumulative sum.
        q.copy_(row_z).scatter_(-1, row_top.long(), float("-inf"))
        top = q.amax(-1, keepdim=True)  # (L, 1)
        q.sub_(top).exp_()  # p~ up to its sum, exactly 0 on the top-k
        total = q.sum(-1)
        # H(p~) = log Z - E_p~[z]; an infinite logit (p~ = 0 there) makes 0 * inf = nan,
        # and then the entropy is summed the slow, masked way.
        log_norm = top.squeeze(-1) + total.log()
        entropy = log_norm - torch.bmm(q.unsqueeze(1), row_z.unsqueeze(-1)).view(-1) / total
        if not torch.isfinite(entropy).all():
            pt = q / total.unsqueeze(-1)
            entropy = -(pt * torch.log(pt).masked_fill(pt == 0, 0.0)).sum(-1)
        entropies.append(entropy)
        g = torch.Generator(device=q.device)
        g.manual_seed(int(np.random.SeedSequence([0x7A11, int(seed) & (2**63 - 1)])
                          .generate_state(1, np.uint64)[0]) >> 1)
        # Inverse CDF: half the time of torch.multinomial with replacement. An id's
        # interval [cdf[i-1], cdf[i]) is empty where p~ = 0, so no top-k id is drawn.
        cdf = q.cumsum_(-1)
        u = torch.rand(cdf.shape[0], m, generator=g, device=q.device) * cdf[:, -1:]
        draws.append(torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[-1] - 1))
    return torch.stack(draws), torch.stack(entropies)


def encode(topk_ids: Any, topk_logits: Any, lse: Any, config: LabelConfig,
           vocab_size: int, tail: tuple[Any, Any] | None = None) -> dict[str, np.ndarray]:
    """Teacher output (torch, (B, L, k) sorted by descending logit; lse (B, L) at T;
    tail: `sample_tail`'s ids and entropy, when the job draws them) -> numpy columns in
    the job's encoding."""
    import torch

    extra = {} if tail is None else _encode_tail(*tail, config.encoding, vocab_size)
    if config.encoding == "exact":
        return {"topk_ids": topk_ids.to(torch.int32).cpu().numpy(),
                "topk_logits": topk_logits.float().cpu().numpy(),
                "lse": lse.float().cpu().numpy(), **extra}
    from raykd.student.losses import tail_log_mass

    log_p = topk_logits.float() / config.temperature - lse.float().unsqueeze(-1)
    extra["tail_logprob"] = tail_log_mass(log_p).half().cpu().numpy()
    if config.encoding == "fp16":
        return {"topk_ids": _id_array(topk_ids, vocab_size),
                "topk_logprobs": log_p.half().cpu().numpy(), **extra}
    if config.encoding == "compact":
        return {**_encode_compact(topk_ids, log_p, vocab_size), **extra}
    raise ValueError(f"unknown soft-label encoding {config.encoding!r}")


def decode(batch: dict[str, Any], temperature: float, device: Any = None) -> SoftLabels:
    """Columns of a batch (torch tensors) -> SoftLabels on `device`, any encoding."""
    import torch

    tail_ids, tail_entropy = _decode_tail(batch, device)
    if "topk_logits" in batch:
        logits = batch["topk_logits"].to(device=device, dtype=torch.float32)
        lse = batch["lse"].to(device=device, dtype=torch.float32)
        return SoftLabels(batch["topk_ids"].to(device=device, dtype=torch.long),
                          logits / temperature - lse.unsqueeze(-1), None, tail_ids,
                          tail_entropy)
    tail = batch.get("tail_logprob")
    tail = None if tail is None else tail.to(device=device, dtype=torch.float32)
    if "topk_logprobs" in batch:
        return SoftLabels(_ids(batch["topk_ids"], device),
                          batch["topk_logprobs"].to(device=device, dtype=torch.float32), tail,
                          tail_ids, tail_entropy)
    if "topk_id_planes" in batch:
        ids, log_p = _decode_compact(batch, device)
        return SoftLabels(ids, log_p, tail, tail_ids, tail_entropy)
    raise KeyError("batch has no soft-label columns (topk_logits, topk_logprobs or "
                   "topk_id_planes)")


def empty_label_columns(encoding: str, batch: int, seq_len: int, k: int, vocab_size: int,
                        tail_samples: int = 0) -> dict[str, np.ndarray]:
    """Zero-filled label columns of the right dtypes and shapes (for padding batches)."""
    extra = {}
    if tail_samples:
        ids_shape = (batch, seq_len, tail_samples)
        extra = {"tail_entropy": np.zeros((batch, seq_len),
                                          np.float32 if encoding == "exact" else np.float16)}
        if encoding == "compact":
            extra["tail_id_planes"] = np.zeros((batch, seq_len, _planes(vocab_size),
                                                tail_samples), np.uint8)
        else:
            extra["tail_ids"] = np.zeros(ids_shape, np.int32 if encoding == "exact"
                                         else _id_dtype(vocab_size))
    if encoding == "exact":
        return {"topk_ids": np.zeros((batch, seq_len, k), np.int32),
                "topk_logits": np.zeros((batch, seq_len, k), np.float32),
                "lse": np.zeros((batch, seq_len), np.float32), **extra}
    extra["tail_logprob"] = np.zeros((batch, seq_len), np.float16)
    if encoding == "fp16":
        return {"topk_ids": np.zeros((batch, seq_len, k), _id_dtype(vocab_size)),
                "topk_logprobs": np.zeros((batch, seq_len, k), np.float16), **extra}
    planes = _planes(vocab_size)
    return {"topk_id_planes": np.zeros((batch, seq_len, planes, k), np.uint8),
            "topk_q": np.zeros((batch, seq_len, k), np.uint8),
            "top_logprob": np.zeros((batch, seq_len), np.float16), **extra}


# --------------------------------------------------------------------------- tail samples


def _encode_tail(ids: Any, entropy: Any, encoding: str, vocab_size: int
                 ) -> dict[str, np.ndarray]:
    import torch

    if encoding == "exact":
        return {"tail_ids": ids.to(torch.int32).cpu().numpy(),
                "tail_entropy": entropy.float().cpu().numpy()}
    out = {"tail_entropy": entropy.half().cpu().numpy()}
    if encoding == "compact":  # the draws' order carries nothing: sort and delta-code them
        out["tail_id_planes"] = _delta_planes(torch.sort(ids.long(), dim=-1).values,
                                              vocab_size)
    else:
        out["tail_ids"] = _id_array(ids, vocab_size)
    return out


def _decode_tail(batch: dict[str, Any], device: Any) -> tuple[Any, Any]:
    import torch

    if "tail_entropy" not in batch:
        return None, None
    entropy = batch["tail_entropy"].to(device=device, dtype=torch.float32)
    if "tail_id_planes" in batch:
        return _undelta(batch["tail_id_planes"], device), entropy
    return _ids(batch["tail_ids"], device), entropy


# --------------------------------------------------------------------------- compact


def _planes(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(max(vocab_size, 2)) / 8))


def _id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest integer type that holds every id of the vocabulary."""
    return np.dtype(np.int32 if vocab_size > 65536 else np.uint16)


def _id_array(ids: Any, vocab_size: int) -> np.ndarray:
    """Token ids (a torch tensor) -> numpy, in `_id_dtype` (torch has the same names)."""
    import torch

    return ids.to(getattr(torch, _id_dtype(vocab_size).name)).cpu().numpy()


def _delta_planes(sorted_ids: Any, vocab_size: int) -> np.ndarray:
    """Ascending ids (..., n) -> their deltas split into byte planes (..., P, n) uint8."""
    import torch

    delta = torch.diff(sorted_ids, dim=-1, prepend=torch.zeros_like(sorted_ids[..., :1]))
    planes = [((delta >> (8 * p)) & 0xFF).to(torch.uint8) for p in range(_planes(vocab_size))]
    return torch.stack(planes, dim=-2).cpu().numpy()


def _undelta(planes: Any, device: Any) -> Any:
    """`_delta_planes` inverted: (..., P, n) uint8 -> ascending ids (..., n) int64."""
    import torch

    planes = planes.to(device=device, dtype=torch.long)
    shifts = (8 * torch.arange(planes.shape[-2], device=planes.device)).view(1, 1, -1, 1)
    return torch.cumsum((planes << shifts).sum(-2), dim=-1)


def _encode_compact(topk_ids: Any, log_p: Any, vocab_size: int) -> dict[str, np.ndarray]:
    import torch

    top = log_p[..., :1]  # (B, L, 1): the largest log-probability (input is sorted by logit)
    ids, order = torch.sort(topk_ids.long(), dim=-1)
    lp = log_p.gather(-1, order)
    q = torch.round(torch.exp((lp - top) / _Q_ROOT) * _Q_MAX).clamp(0, _Q_MAX).to(torch.uint8)
    return {"topk_id_planes": _delta_planes(ids, vocab_size),  # (B, L, P, k)
            "topk_q": q.cpu().numpy(),
            "top_logprob": top.squeeze(-1).half().cpu().numpy()}


def _decode_compact(batch: dict[str, Any], device: Any) -> tuple[Any, Any]:
    import torch

    ids = _undelta(batch["topk_id_planes"], device)
    q = batch["topk_q"].to(device=device, dtype=torch.float32)
    top = batch["top_logprob"].to(device=device, dtype=torch.float32).unsqueeze(-1)
    # q = 0 means p < p_max / 510^3: decode it as half a step, not as probability 0, so
    # that reverse KL stays finite.
    log_p = top + _Q_ROOT * torch.log(q.clamp(min=0.5) / _Q_MAX)
    return ids, log_p


def _ids(ids: Any, device: Any) -> Any:
    import torch

    if ids.dtype == torch.uint16:  # torch has few uint16 kernels; widen via int32
        ids = ids.view(torch.int16).to(torch.int32) & 0xFFFF
    return ids.to(device=device, dtype=torch.long)
