"""Soft-label encodings: bytes per token on disk and KD-loss error, side by side.

    python -m bench.encodings [--sequences 16] [--k 64] [--tail-samples 64]

Labels: SmolLM2-135M-Instruct's top-k on Shakespeare (sequences of 128 tokens). Bytes
per token: a cache shard exactly as raykd writes it (parquet, zstd 15), including the
token ids and bookkeeping columns, divided by the tokens it holds. Loss error: the KD loss
from the decoded labels relative to the loss from exact fp32 top-k, for two real
students: SmolLM2 cut to 4 layers (evenly spaced, untrained: far from the teacher) and
the teacher's logits with noise (KL about 1 nat: near it); forward and reverse KL at
T = 1 and 2; and, with --student DIR (default: runs/quickstart/student when it exists),
a trained student too. The largest error over those cases is reported per encoding.
With --tail-samples m, also the bytes per token of the same shard with m tail samples
per position (`labels.tail_samples`).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from bench.common import SMOLLM2, report, shakespeare_ids
from raykd.data import soft_labels
from raykd.data.label_cache import Lineage, table_bytes
from raykd.data.soft_labels import ENCODINGS, LabelConfig
from raykd.student.config import StudentConfig
from raykd.student.losses import sparse_kl
from raykd.student.model import build_student
from raykd.teacher.loading import load_model, materialize
from raykd.teacher.replica import label_logits

LINEAGE = Lineage("t", "tok", "d", 128, 64, 1.0, "x", "float32", None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--student", default="runs/quickstart/student")
    ap.add_argument("--tail-samples", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model_dir = materialize(SMOLLM2)
    teacher = load_model(model_dir, "float32", "cpu")
    ids = torch.from_numpy(shakespeare_ids("hamlet", args.sequences, 128, offset=50)).long()
    with torch.no_grad():
        t_logits = torch.cat([teacher(input_ids=ids[i:i + 4]).logits
                              for i in range(0, len(ids), 4)])
        cut = build_student(teacher.config, StudentConfig(num_layers=4, init_from_teacher=True),
                            teacher.state_dict()).eval()
        s_cut = torch.cat([cut(input_ids=ids[i:i + 4]).logits for i in range(0, len(ids), 4)])
    gen = torch.Generator().manual_seed(0)
    s_near = t_logits * 0.8 + torch.randn(t_logits.shape, generator=gen) * 1.5
    students = {"teacher cut to 4 layers": s_cut, "teacher + noise": s_near}
    if os.path.exists(os.path.join(args.student, "config.json")):
        trained = load_model(args.student, "float32", "cpu")
        with torch.no_grad():
            students[args.student] = torch.cat(
                [trained(input_ids=ids[i:i + 4]).logits for i in range(0, len(ids), 4)])
    vocab = t_logits.shape[-1]
    tokens = ids.numel()
    rows = {}
    for encoding in ENCODINGS:
        worst = 0.0
        size = 0
        for T in (1.0, 2.0):
            cfg = LabelConfig(top_k=args.k, temperature=T, encoding=encoding)
            cols = label_logits(t_logits, cfg, vocab)
            exact = soft_labels.decode(_tensors(label_logits(
                t_logits, LabelConfig(top_k=args.k, temperature=T, encoding="exact"), vocab)), T)
            coded = soft_labels.decode(_tensors(cols), T)
            for student in students.values():
                for kind in ("forward_kl", "reverse_kl"):
                    ref = sparse_kl(student, exact.topk_ids, exact.log_p, T, kind).mean()
                    got = sparse_kl(student, coded.topk_ids, coded.log_p, T, kind,
                                    coded.log_tail).mean()
                    worst = max(worst, abs(float(got) / float(ref) - 1))
            if T == 1.0:
                sample_ids = np.arange(len(ids), dtype=np.int64)
                shard = {"sample_id": sample_ids, "input_ids": ids.numpy().astype(np.int32),
                         "length": np.full(len(ids), 128, np.int32),
                         "labeled_at": np.zeros(len(ids))}
                size = len(table_bytes({**shard, **cols}, LINEAGE))
                if args.tail_samples:
                    drawn = LabelConfig(top_k=args.k, encoding=encoding,
                                        tail_samples=args.tail_samples)
                    tail_size = len(table_bytes(
                        {**shard, **label_logits(t_logits, drawn, vocab, sample_ids)},
                        LINEAGE))
        rows[encoding] = {"bytes_per_token": round(size / tokens, 1),
                          "max_rel_loss_error": float(f"{worst:.2e}")}
        if args.tail_samples:
            rows[encoding][f"bytes_per_token_with_{args.tail_samples}_tail_samples"] = round(
                tail_size / tokens, 1)
    report("encodings", {"k": args.k, "tokens": tokens, "students": list(students),
                         "results": rows,
                         "goal": "compact <= 128 B/token at k=64, error <= 1e-3"})


def _tensors(cols: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in cols.items()}


if __name__ == "__main__":
    main()
