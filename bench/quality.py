"""Distillation quality: held-out perplexity of one student trained four ways.

    python -m bench.quality [--plays 2] [--layers 8] [--epochs 1] [--seed 0]
                            [--out docs/quality.png]

SmolLM2-135M-Instruct (30 layers) teaches a student with a quarter of its layers
(default 8, the teacher's width and vocabulary) on Shakespeare. Every run has the same
data, token budget (one epoch unless --epochs), schedule, seed and held-out set; only the
signal differs:

  ce_only          alpha = 0: next-token cross-entropy alone (no teacher in the loss)
  kd_full_vocab    KL to the teacher's whole distribution (a co-located teacher with
                   labels.top_k = the vocabulary: no labels stored, the exact target)
  kd_topk_tail64   raykd's default: top-64 labels in the compact encoding plus 64 ids per
                   position drawn from the teacher's distribution outside the top-64
                   (labels.tail_samples), streamed from the teacher pool through the cache
  kd_topk_compact  as kd_topk_tail64 without the draws (labels.tail_samples: 0, the tail
                   as one outcome; raykd's default until 2026-12-01)
  kd_topk_init     as kd_topk_tail64, the student initialised from every n-th teacher layer

and, on request (--only ...), kd_top512_compact (top-512 labels, no draws), each with its
own label cache; and the two KD runs with all the weight on the teacher (kd_topk_alpha1,
kd_full_vocab_alpha1: alpha = 1, no cross-entropy term).

alpha = 0.5, T = 1 for the KD runs (the quickstart's settings). The student starts from
random weights except in kd_topk_init. kd_topk_tail64 runs first and fills the label
cache; ce_only and kd_topk_init then read it (the teacher is not run twice): the same
rows, in the cache's seeded order instead of the ids' (data.shuffle; --no-shuffle trains
the files in turn, as runs before data.shuffle did). Prints a JSON summary, and plots every run's
held-out perplexity against steps with the teacher's as a line (--out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import SMOLLM2, TEXTS, report, scratch

PLAYS = ["macbeth", "tempest", "comedy_of_errors", "julius_caesar", "twelfth_night"]


def job(out: str, name: str, plays: list[str], layers: int, epochs: int = 1, seed: int = 0,
        **over: dict) -> dict:
    spec = {
        "run": {"name": name, "output_dir": out, "seed": seed},
        "data": {"source": [f"{TEXTS}/{p}_gut.txt" for p in plays], "seq_len": 128,
                 "eval_fraction": 0.04, "eval_max_samples": 32},
        "teacher": {"model": SMOLLM2, "batch_size": 8, "num_cpus": 1},
        "labels": {"top_k": 64, "temperature": 1.0, "tail_samples": 64},
        "student": {"num_layers": layers, "init_from_teacher": False},
        "loss": {"alpha": 0.5, "kind": "forward_kl"},
        "train": {"num_workers": 1, "cpus_per_worker": 1, "batch_size": 8,
                  "micro_batch_size": 8, "epochs": epochs, "lr": 1e-3, "warmup_steps": 5,
                  "schedule": "cosine", "zero_stage": 2, "log_every": 10,
                  "eval_every": 10},
    }
    for part, values in over.items():
        spec[part] = {**spec[part], **values}
    # One cache per top-k: a cache holds labels of one lineage and refuses any other.
    labels = spec["labels"]
    labels["cache"] = f"{out}/label-cache-k{labels['top_k']}-tail{labels['tail_samples']}"
    return spec


DEFAULT = "kd_topk_tail64"  # the run with raykd's default labels

RUNS = {
    DEFAULT: {},
    # The tail left as one outcome: what the 64 draws per position buy.
    "kd_topk_compact": {"labels": {"tail_samples": 0}},
    "ce_only": {"loss": {"alpha": 0.0}},
    "kd_topk_init": {"student": {"init_from_teacher": True}},
    # 8x the ids and no draws: how far top-k alone must go to match the whole
    # vocabulary (bench.tail: k = 512 closes the gap on one epoch, at ~8x the bytes).
    "kd_top512_compact": {"labels": {"top_k": 512, "tail_samples": 0}},
    # All weight on the teacher's distribution (alpha = 1), otherwise as the default.
    "kd_topk_alpha1": {"loss": {"alpha": 1.0}},
    "kd_full_vocab_alpha1": {"teacher": {"colocated": True}, "labels": {"top_k": 49152},
                             "train": {"cpus_per_worker": 2}, "loss": {"alpha": 1.0}},
    # The whole vocabulary as the target: the teacher runs inside the step (2 threads, the
    # same 2 CPUs the pool and the student share in the streamed runs).
    "kd_full_vocab": {"teacher": {"colocated": True}, "labels": {"top_k": 49152},
                      "train": {"cpus_per_worker": 2}},
}


def plot(curves: dict[str, tuple[list[int], list[float]]], teacher_ppl: float, path: str
         ) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (steps, ppl) in curves.items():
        # From the first evaluation after step 0: the random starts (~5e4, and ~3e7 for
        # the layer-copied student) would flatten the differences that matter.
        points = [(s, p) for s, p in zip(steps, ppl) if s > 0]
        ax.plot([s for s, _ in points], [p for _, p in points], marker="o", markersize=3,
                label=f"{name} ({points[-1][1]:.1f})")
    ax.axhline(teacher_ppl, color="black", linestyle="--", linewidth=1,
               label=f"teacher ({teacher_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M -> 8-layer student on Shakespeare (same tokens, seed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    import ray

    from raykd.config import job_from_dict
    from raykd.run_dir import read_metrics
    from raykd.runner import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--plays", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1,
                    help="passes over the training data (later ones from the label cache); "
                         "other than 1, the default --out and --results get a suffix")
    ap.add_argument("--seed", type=int, default=0,
                    help="run.seed: the student's initial weights and the data order; "
                         "other than 0, the default --out and --results get a suffix")
    ap.add_argument("--no-shuffle", action="store_true",
                    help="data.shuffle: false, the files in turn (how runs before "
                         "data.shuffle trained)")
    ap.add_argument("--out", default=None, help="default docs/quality[-<n>ep][-seed<n>].png")
    ap.add_argument("--only", nargs="*", choices=list(RUNS),
                    default=[r for r in RUNS if not any(x in r for x in ("alpha1", "512"))])
    ap.add_argument("--results", default=None,
                    help="results of earlier invocations are kept and plotted too "
                         "(default docs/quality[-<n>ep].json)")
    ap.add_argument("--plot-only", action="store_true", help="replot --results, run nothing")
    args = ap.parse_args()
    suffix = ("" if args.epochs == 1 else f"-{args.epochs}ep") + \
        ("" if args.seed == 0 else f"-seed{args.seed}")
    args.out = args.out or f"docs/quality{suffix}.png"
    args.results = args.results or f"docs/quality{suffix}.json"
    if args.plot_only:
        saved = json.loads(Path(args.results).read_text())
        teacher = next(iter(saved["runs"].values()))["teacher_eval_ppl"]
        plot(saved["curves"], teacher, args.out)
        return
    out = scratch("raykd-quality-")
    plays = PLAYS[: args.plays]
    saved = json.loads(Path(args.results).read_text()) if Path(args.results).exists() else {}
    results, curves = saved.get("runs", {}), saved.get("curves", {})
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        for name in args.only:
            spec = job(out, name, plays, args.layers, args.epochs, args.seed, **RUNS[name])
            spec["data"]["shuffle"] = not args.no_shuffle
            s = run(job_from_dict(spec),
                    log=lambda line: print(line, flush=True)).summary
            rows = [m for m in read_metrics(Path(s["run_dir"]) / "metrics.jsonl")
                    if "eval_ppl" in m]
            curves[name] = ([m["step"] for m in rows], [m["eval_ppl"] for m in rows])
            results[name] = {k: s[k] for k in ("student_eval_ppl", "student_eval_ppl_start",
                                                "teacher_eval_ppl", "steps", "tokens",
                                                "wall_s")}
            print(json.dumps({name: results[name]}), flush=True)
            Path(args.results).write_text(json.dumps({"runs": results, "curves": curves},
                                                     indent=1) + "\n")
    finally:
        ray.shutdown()
    teacher = next(iter(results.values()))["teacher_eval_ppl"]
    plot(curves, teacher, args.out)
    ppl = {k: v["student_eval_ppl"] for k, v in results.items()}
    ratios = {}
    if {"ce_only", DEFAULT} <= set(ppl):
        ratios["kd_topk_vs_ce_only"] = round(ppl[DEFAULT] / ppl["ce_only"] - 1, 4)
    if {"ce_only", "kd_topk_alpha1"} <= set(ppl):
        ratios["kd_topk_alpha1_vs_ce_only"] = round(ppl["kd_topk_alpha1"] / ppl["ce_only"] - 1, 4)
    if {"kd_full_vocab_alpha1", "kd_topk_alpha1"} <= set(ppl):
        ratios["kd_topk_alpha1_vs_full_vocab_alpha1"] = round(
            ppl["kd_topk_alpha1"] / ppl["kd_full_vocab_alpha1"] - 1, 4)
    for name in ("kd_top512_compact", "kd_topk_compact"):
        if {"ce_only", "kd_full_vocab", name} <= set(ppl):
            ratios[f"{name}_vs_ce_only"] = round(ppl[name] / ppl["ce_only"] - 1, 4)
            ratios[f"{name}_vs_full_vocab"] = round(ppl[name] / ppl["kd_full_vocab"] - 1, 4)
    if {"kd_full_vocab", DEFAULT} <= set(ppl):
        ratios["kd_topk_vs_full_vocab"] = round(ppl[DEFAULT] / ppl["kd_full_vocab"] - 1, 4)
    report("quality", {"plays": plays, "student_layers": args.layers, "runs": results,
                       "relative_ppl": ratios, "plot": args.out,
                       "goals": {"kd_topk_vs_ce_only": "<= -0.10",
                                 "kd_topk_vs_full_vocab": "<= +0.01"}})


if __name__ == "__main__":
    main()
