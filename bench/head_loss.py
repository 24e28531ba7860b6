"""The student's step with full logits vs the chunked LM head + loss (raykd.student.head_loss).

    python -m bench.head_loss [--steps 6]

The quickstart's student (SmolLM2's config cut to 4 layers, vocabulary 49,152) on a
micro-batch of 8 x 128 tokens with top-64 labels, AdamW, one thread. Time and minor page
faults: one process, one model, the variants' steps interleaved (the order rotating) so
that the machine's noise falls on all of them alike. Peak RSS of the training steps: a
fresh process per variant, 2 steps after the first. Prints each variant's medians and
their ratios to full logits.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

VARIANTS = {"full": 0, "chunk 2^20": 1 << 20, "chunk 2^21": 1 << 21, "chunk 2^22": 1 << 22}


def setup() -> tuple:
    import torch
    from transformers import AutoConfig

    from bench.common import SMOLLM2
    from raykd.data.soft_labels import SoftLabels
    from raykd.student.config import StudentConfig
    from raykd.student.losses import tail_log_mass
    from raykd.student.model import build_student
    from raykd.teacher.loading import materialize

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_student(AutoConfig.from_pretrained(materialize(SMOLLM2)),
                          StudentConfig(num_layers=4))
    V = model.config.vocab_size
    B, L, k = 8, 128, 64
    input_ids = torch.randint(0, V, (B, L))
    length = torch.full((B,), L)
    log_p, _ = torch.log_softmax(torch.randn(B, L, k) * 3, -1).sort(-1, descending=True)
    log_p = log_p + np.log(0.95)  # 5 % of the mass in the tail
    labels = SoftLabels(torch.randint(0, V, (B, L, k)), log_p, tail_log_mass(log_p))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt, (input_ids, length, labels)


def stepper(model, opt, batch, chunk_elements: int):
    from raykd.student import head_loss
    from raykd.student.head_loss import StudentLoss

    loss_fn = StudentLoss(model, model.config.vocab_size, alpha=0.5, temperature=1.0,
                          chunked=bool(chunk_elements))

    def step() -> None:
        head_loss.CHUNK_ELEMENTS = chunk_elements or head_loss.CHUNK_ELEMENTS
        parts = loss_fn(*batch)
        parts.loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # the first call checks the head; then the chunk size is this variant's
    assert bool(loss_fn.chunked) == bool(chunk_elements)
    return step


def peak_rss(chunk_elements: int) -> float:
    """Peak RSS over training steps only (not the set-up, which loads the teacher's
    weights to build the student): the kernel's high-water mark is reset after step 1."""
    model, opt, batch = setup()
    step = stepper(model, opt, batch, chunk_elements)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    for _ in range(2):
        step()
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmHWM"].split()[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rss", type=int, help=argparse.SUPPRESS)  # one variant, own process
    args = ap.parse_args()
    if args.rss is not None:
        print(json.dumps(peak_rss(args.rss)))
        return
    model, opt, batch = setup()
    steps = {name: stepper(model, opt, batch, n) for name, n in VARIANTS.items()}
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    faults: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for i in range(args.steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            steps[name]()
            seconds[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(f"step {i + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names),
              flush=True)
    rss = {}
    for name, n in VARIANTS.items():
        out = subprocess.run([sys.executable, "-m", "bench.head_loss", "--rss", str(n)],
                             check=True, capture_output=True, text=True)
        rss[name] = json.loads(out.stdout.strip().splitlines()[-1])
    s = {n: float(np.median(v)) for n, v in seconds.items()}
    f = {n: float(np.median(v)) for n, v in faults.items()}
    print(f"\n{'variant':<12} {'s/step':>8} {'faults/step':>12} {'peak RSS MB':>12} "
          f"{'time/full':>10} {'faults/full':>12} {'RSS/full':>9}")
    for n in names:
        print(f"{n:<12} {s[n]:>8.3f} {f[n]:>12.0f} {rss[n]:>12.0f} {s[n] / s['full']:>10.3f} "
              f"{f[n] / f['full']:>12.3f} {rss[n] / rss['full']:>9.3f}")


if __name__ == "__main__":
    main()
