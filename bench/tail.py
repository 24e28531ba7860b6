"""What the top-k labels lose: students trained side by side on the teacher's tail.

    python -m bench.tail [--variants bucket sampled full ce prior unigram] [--seed 0]
                        [--samples 16] [--top-k 64 [128 ...]] [--init-from-teacher] [--epochs 1]
                        [--threads 2]

raykd's labels keep the teacher's top-k probabilities exactly and its remaining mass as
one number (`raykd.student.losses`): the student learns how much mass belongs outside the
top-k but keeps its own shape there. This bench asks how much that costs against the
teacher's whole distribution, and whether a few ids drawn from the teacher's tail (what a
label could store next to the top-k) buy it back. One process, plain torch, the student's
full logits; every variant sees the same batches, initial weights and schedule:

  bucket   raykd's loss: top-k (default 64) + the tail mass as one outcome
  sampled  bucket + the tail's shape from m ids drawn from the teacher's tail distribution
           (the chain rule KL(p||q) = KL over top-k + tail outcome + p_tail KL(p~||q~),
           its last term's gradient estimated without bias from the draws)
  prior    bucket + the tail's shape taken from one fixed vector for the whole run (no
           bytes per token): the teacher's average distribution over the training data
  unigram  as prior, the vector being the training tokens' add-one unigram frequencies
  full     KL over the whole vocabulary
  ce       next-token cross-entropy alone

alpha = 0.5, T = 1, lr 1e-3 (5 warmup steps, cosine to 0.1), as bench.quality; torch's
AdamW with its default betas (0.9, 0.999; raykd's default is 0.95), no weight decay. Data:
224 sequences of 128 tokens from each of Macbeth and The Tempest (56 steps of 8 per
epoch; later epochs take the same batches in a new order), held out the next 16 of each.
The student starts from random weights, or from every n-th teacher layer
(--init-from-teacher). The SmolLM2 teacher labels every batch once up front; `full` runs
it again inside each step. Prints one JSON line per variant (held-out perplexity, curve).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

B, L = 8, 128
PLAYS = ["macbeth", "tempest"]
TRAIN, HELD = 224, 16


def main() -> None:
    import torch

    from bench.common import SMOLLM2, machine, shakespeare_ids
    from raykd.student.config import StudentConfig, TrainConfig
    from raykd.student.losses import dense_kl, sparse_kl, tail_log_mass
    from raykd.student.model import build_student
    from raykd.student.optim import lr_lambda
    from raykd.teacher.loading import load_model, materialize

    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=["bucket", "sampled", "full", "ce"],
                    choices=["bucket", "sampled", "full", "ce", "prior", "unigram"])
    ap.add_argument("--seed", type=int, default=0, help="data order and student init")
    ap.add_argument("--samples", type=int, default=16, help="tail ids drawn per position")
    ap.add_argument("--top-k", type=int, nargs="+", default=[64],
                    help="the labels' top-k; several values run `bucket` once for each")
    ap.add_argument("--epochs", type=int, default=1,
                    help="passes over the same training sequences (the batches in a new "
                         "order each pass, the same for every variant)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--init-from-teacher", action="store_true",
                    help="start the student from every n-th teacher layer, as "
                         "bench.quality's kd_topk_init, instead of random weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m, K = args.samples, max(args.top_k)
    if len(args.top_k) > 1 and set(args.variants) & {"sampled"}:
        ap.error("sampled draws from outside one top-k: give one --top-k with it")

    train = np.concatenate([shakespeare_ids(p, TRAIN, L) for p in PLAYS])
    held = np.concatenate([shakespeare_ids(p, HELD, L, offset=TRAIN + 4) for p in PLAYS])
    order = np.random.default_rng(args.seed).permutation(len(train))
    teacher = load_model(materialize(SMOLLM2), "float32", "cpu").eval()
    V = teacher.config.vocab_size

    def teacher_logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return teacher(input_ids=ids).logits.float()

    started, batches = time.time(), []
    mean_p = torch.zeros(V, dtype=torch.float64)  # the teacher's average distribution
    for s in range(0, len(train), B):
        ids = torch.from_numpy(train[order[s:s + B]]).long()
        log_p = torch.log_softmax(teacher_logits(ids), -1)
        mean_p += log_p.exp().sum((0, 1)).double()
        top_lp, top_ids = log_p.topk(K, -1)
        tail = tail_log_mass(top_lp)
        tail_p = log_p.exp().scatter(-1, top_ids, 0.0).reshape(-1, V)
        draws = torch.multinomial(tail_p, m, replacement=True,
                                  generator=torch.Generator().manual_seed(1000 + s))
        batches.append((ids, top_ids, top_lp, tail, draws.reshape(B, L, m)))
    tail_mass = {k: round(float(torch.cat([tail_log_mass(b[2][..., :k]).exp().flatten()
                                           for b in batches]).mean()), 4)
                 for k in args.top_k}
    print(json.dumps({"labels_s": round(time.time() - started, 1),
                      "mean_tail_mass": tail_mass, "machine": machine()}), flush=True)
    # Fixed tail shapes, one vector for the whole run (no bytes per token): the teacher's
    # average distribution, or the training tokens' add-one unigram frequencies.
    tail_shape = {"prior": (mean_p / mean_p.sum()).float(),
                  "unigram": (torch.bincount(torch.from_numpy(train).long().flatten(),
                                             minlength=V).double() + 1).float()}
    tail_shape["unigram"] /= tail_shape["unigram"].sum()
    mask = torch.ones(B, L)
    mask[:, -1] = 0  # the last position has no next token

    def loss_of(variant: str, k: int, model, ids, top_ids, top_lp, tail, draws
                ) -> torch.Tensor:
        x = model(input_ids=ids).logits.float()
        targets = torch.nn.functional.pad(ids[:, 1:], (0, 1))
        ce = torch.logsumexp(x, -1) - x.gather(-1, targets[..., None]).squeeze(-1)
        if variant == "ce":
            return (ce * mask).sum() / mask.sum()
        if variant == "full":
            kd = dense_kl(x, torch.log_softmax(teacher_logits(ids), -1), 1.0)
        else:
            if k < K:  # labels are sorted: the top-k of a smaller k are the first k
                top_ids, top_lp = top_ids[..., :k], top_lp[..., :k]
                tail = tail_log_mass(top_lp)
            kd = sparse_kl(x, top_ids, top_lp, 1.0, teacher_log_tail=tail)
        if variant == "sampled" or variant in tail_shape:  # + p_tail H(p~, q~): the shape
            lse = torch.logsumexp(x, -1, keepdim=True)
            log_q_tail = tail_log_mass(x.gather(-1, top_ids) - lse)[..., None]
            if variant == "sampled":  # H estimated from the draws, log q~(j) at each
                cross = -(x.gather(-1, draws) - lse - log_q_tail).mean(-1)
            else:  # the tail's shape taken from a fixed vector
                r = tail_shape[variant].expand_as(x).scatter(-1, top_ids, 0.0)
                r = r / r.sum(-1, keepdim=True)
                cross = -(r * (x - lse - log_q_tail)).sum(-1)
            kd = kd + tail.exp() * cross
        return ((0.5 * kd + 0.5 * ce) * mask).sum() / mask.sum()

    def held_out_ppl(model) -> float:
        nll, n = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(held), B):
                ids = torch.from_numpy(held[s:s + B]).long()
                x = model(input_ids=ids).logits.float()[:, :-1]
                nll += float((torch.logsumexp(x, -1)
                              - x.gather(-1, ids[:, 1:, None]).squeeze(-1)).sum())
                n += x.shape[0] * x.shape[1]
        return math.exp(nll / n)

    # raykd's own schedule, as the quickstart and bench.quality configure it.
    steps = len(batches) * args.epochs
    lr_at = lr_lambda(TrainConfig(lr=1e-3, warmup_steps=5, schedule="cosine"), steps)
    epoch_orders = [np.random.default_rng([args.seed, e]).permutation(len(batches))
                    if e else np.arange(len(batches)) for e in range(args.epochs)]
    schedule = [batches[i] for order in epoch_orders for i in order]

    runs = [(v, k) for v in args.variants for k in (args.top_k if v == "bucket" else [K])]
    for variant, k in runs:
        torch.manual_seed(args.seed)
        model = build_student(teacher.config,
                              StudentConfig(num_layers=args.layers,
                                            init_from_teacher=args.init_from_teacher),
                              teacher.state_dict() if args.init_from_teacher else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        started, curve = time.time(), []
        for step, batch in enumerate(schedule):
            loss = loss_of(variant, k, model, *batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if (step + 1) % 20 == 0 or step + 1 == steps:
                curve.append((step + 1, round(held_out_ppl(model), 2)))
        print(json.dumps({"variant": variant, "seed": args.seed, "top_k": k, "samples": m,
                          "init_from_teacher": args.init_from_teacher, "epochs": args.epochs,
                          "held_out_ppl": round(held_out_ppl(model), 2), "curve": curve,
                          "s": round(time.time() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
