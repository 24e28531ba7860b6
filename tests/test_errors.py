"""Bad input, through the real `raykd` command: each case must fail with exit code 2 and
exactly one stderr line `raykd: error: ...` that names the key or file to fix, no traceback,
and nothing written (no run directory, no label cache). All but the xfail case fail before
Ray starts, most in well under a second."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.tiny import make_llama, make_tokenizer, shakespeare


@dataclass
class World:
    """Files the cases point at, built once per module (tiny models, small data)."""

    root: Path
    teacher: Path
    runs: Path  # run.output_dir of every case; must stay absent
    job: Path  # a valid job: tiny teacher, one small text file

    def fmt(self, text: str) -> str:
        return text.format(root=self.root, teacher=self.teacher, runs=self.runs, job=self.job)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> World:
    root = tmp_path_factory.mktemp("errors")
    data = root / "data"
    data.mkdir()
    (data / "good.txt").write_text(Path(shakespeare("sonnets")).read_text()[:20_000])
    (data / "empty.txt").write_text("")
    (root / "one-word.txt").write_text("Sonnet\n")  # one 3-token sequence: nothing held out
    (root / "empty-dir").mkdir()
    (data / "notext.jsonl").write_text(json.dumps({"body": "no text here"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a parquet row without a text column"]}),
                   data / "nocol.parquet")
    (root / "notes.txt").write_text("not a model")
    (root / "no-config").mkdir()
    (root / "no-config" / "model.safetensors").write_bytes(b"\0" * 64)
    (root / "fake.gguf").write_bytes(b"this is not a GGUF file" * 8)
    other_tok = root / "other-tokenizer"
    make_tokenizer(other_tok, vocab_size=400)
    make_llama(root / "foreign", layers=1, vocab_size=400, tokenizer_from=other_tok)
    make_llama(root / "padded", layers=1, vocab_size=520, tokenizer_from=tiny_teacher)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_layer=1, n_embd=32, n_head=2, bos_token_id=1,
                               eos_token_id=2)
                    ).save_pretrained(root / "gpt2")
    for f in tiny_teacher.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, root / "gpt2" / f.name)
    (root / "existing" / "taken").mkdir(parents=True)
    (root / "existing" / "taken" / "job.yaml").write_text("run: {name: taken}\n")
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "readme.txt").write_text("just a directory")
    (root / "list.yaml").write_text("- data\n- teacher\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01 not text")
    (root / "malformed.yaml").write_text("data:\n  source: [a, b\nteacher: {}\n")
    (root / "no-teacher.yaml").write_text(yaml.safe_dump({"data": {"source": str(data)}}))
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({
        "run": {"name": "bad", "output_dir": str(root / "runs")},
        "data": {"source": str(data / "good.txt"), "seq_len": 32},
        "teacher": {"model": str(tiny_teacher)},
        "labels": {"top_k": 8},
        "train": {"max_steps": 2},
    }))
    return World(root=root, teacher=tiny_teacher, runs=root / "runs", job=job)


def free_port() -> int:
    """A local port nothing listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Case:
    args: list[str]  # after `raykd`; "{job}", "{root}", ... are filled from World
    names: str  # the key or file the one line must name
    words: str  # what it must say about it
    xfail: str | None = None


V = ["validate", "{job}"]
R = ["run", "{job}"]
D = "{root}/data"
CASES: dict[str, Case] = {
    # ---- the job file itself
    "malformed-yaml": Case(["validate", "{root}/malformed.yaml"], "malformed.yaml",
                           "malformed YAML at line"),
    "job-file-missing": Case(["validate", "{root}/nope.yaml"], "nope.yaml", "job file not found"),
    "job-file-not-text": Case(["validate", "{root}/binary.yaml"], "binary.yaml",
                              "not a YAML text file"),
    "job-file-is-a-list": Case(["validate", "{root}/list.yaml"], "list.yaml",
                               "mapping of sections, got a list"),
    "missing-section": Case(["validate", "{root}/no-teacher.yaml"], "teacher", "is required"),
    "missing-required-key": Case([*V, "data.source="], "data.source", "must"),
    # ---- keys and overrides
    "unknown-key": Case([*V, "trian.lr=1"], "trian", "did you mean 'train'"),
    "unknown-nested-key": Case([*V, "teacher.replicas.maxx=2"], "teacher.replicas.maxx",
                               "did you mean 'max'"),
    "override-without-equals": Case([*V, "train.lr"], "train.lr", "key.sub=value"),
    "override-into-a-scalar": Case([*V, "train.lr.warmup=3"], "train.lr",
                                   "must be a number, got a mapping"),
    # ---- types
    "type-int": Case([*V, "train.num_workers=1.5"], "train.num_workers", "must be an integer"),
    "type-float": Case([*V, "train.lr=fast"], "train.lr", "must be a number"),
    "type-bool": Case([*V, "train.use_gpu=maybe"], "train.use_gpu", "true or false"),
    "type-list": Case([*V, "train.betas=0.9"], "train.betas", "must be a list"),
    "type-mapping": Case([*V, "teacher.resources=[1, 2]"], "teacher.resources",
                         "must be a mapping"),
    "type-section": Case([*V, "train=3"], "train", "must be a mapping"),
    # ---- values
    "zero-stage-4": Case([*V, "train.zero_stage=4"], "train.zero_stage", "must be 0-3, got 4"),
    "batch-not-divisible": Case([*V, "train.batch_size=12", "train.num_workers=2",
                                 "train.micro_batch_size=4"], "train.batch_size", "not divisible"),
    "negative-lr": Case([*V, "train.lr=-1e-3"], "train.lr", "must be > 0"),
    "eval-fraction-range": Case([*V, "data.eval_fraction=1.5"], "data.eval_fraction",
                                "must be in [0, 1)"),
    "eval-fraction-zero": Case([*V, "data.eval_fraction=0"], "data.eval_fraction",
                               "nothing is held out"),
    "init-layers-count": Case([*V, "student.init_from_teacher=true", "student.init_layers=[0]"],
                              "student.init_layers", "has 1 entries but num_layers is 4"),
    "init-layers-index": Case([*V, "student.init_from_teacher=true",
                               "student.init_layers=[0,1,2,9]"], "student.init_layers",
                              "index 9 does not exist"),
    "unknown-loss-kind": Case([*V, "loss.kind=kl"], "loss.kind", "must be one of forward_kl"),
    "tp-size-vs-gpus": Case([*V, "teacher.tp_size=2", "teacher.num_gpus=1"], "teacher.num_gpus",
                            "one GPU per rank"),
    # ---- data
    "data-missing-file": Case([*V, f"data.source={D}/missing.txt"], "missing.txt",
                              "does not exist"),
    "data-glob-matches-nothing": Case([*V, f"data.source={D}/*.csv"], "data.source",
                                      "no files match"),
    "data-empty-file": Case([*V, f"data.source={D}/empty.txt"], "empty.txt", "empty"),
    "data-empty-dir": Case([*V, "data.source={root}/empty-dir"], "empty-dir", "no files"),
    "run-jsonl-without-text": Case([*R, f"data.source={D}/notext.jsonl"], "notext.jsonl",
                                   "no 'text' field (data.text_key)"),
    "data-too-short": Case([*R, "data.source={root}/one-word.txt"], "data.source",
                           "pack into only"),
    "jsonl-without-text": Case([*V, f"data.source={D}/notext.jsonl"], "notext.jsonl",
                               "no 'text' field (data.text_key)"),
    "parquet-without-text": Case([*V, f"data.source={D}/nocol.parquet"], "nocol.parquet",
                                 "'text' (data.text_key)"),
    "pkg-not-installed": Case([*V, "data.source=pkg://no-such-dist-raykd/a.txt"],
                              "data.source", "package 'no-such-dist-raykd'"),
    # ---- models
    "teacher-not-a-model": Case([*V, "teacher.model={root}/notes.txt"], "teacher.model",
                                "not a .gguf"),
    "teacher-no-config": Case([*V, "teacher.model={root}/no-config"], "teacher.model",
                              "no config.json"),
    "teacher-fake-gguf": Case([*V, "teacher.model={root}/fake.gguf"], "teacher.model",
                              "fake.gguf"),
    "top-k-over-vocab": Case([*V, "labels.top_k=600"], "labels.top_k",
                             "larger than the teacher's vocabulary (512"),
    "student-other-tokenizer": Case([*V, "student.model={root}/foreign"], "student.model",
                                    "tokenizer differs from the teacher's"),
    "student-padded-vocab": Case([*V, "student.model={root}/padded"], "student.vocab",
                                 "set student.vocab=truncate"),
    "tp-gpt2": Case([*V, "teacher.model={root}/gpt2", "teacher.tp_size=2", "teacher.num_cpus=2"],
                    "teacher.tp_size", "AutoTP cannot split gpt2"),
    # ---- storage
    "s3-unreachable": Case([*V, ("train.storage=s3://bucket/ckpt?endpoint_override="
                                 "127.0.0.1:{port}&scheme=http")], "train.storage",
                           "cannot use s3://bucket/ckpt"),
    "s3-unknown-option": Case([*V, "labels.cache=s3://bucket/labels?endpoint=127.0.0.1:9"],
                              "labels.cache", "unsupported option 'endpoint'"),
    # ---- run directories
    "output-dir-is-a-file": Case([*V, "run.output_dir={root}/notes.txt"], "run.output_dir",
                                 "notes.txt is a file"),
    "run-dir-exists": Case([*R, "run.output_dir={root}/existing", "run.name=taken"], "run.name",
                           "already exists"),
    "resume-not-a-run": Case(["resume", "{root}/not-a-run"], "not-a-run", "not a run directory"),
    "label-without-cache": Case(["label", "{job}", "labels.cache=null"], "labels.cache",
                                "needs a cache"),
}


def raykd(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = shutil.which("raykd") or str(Path(sys.executable).parent / "raykd")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, check=False)


def snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=c.xfail)) if c.xfail else n
    for n, c in CASES.items()])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name: str, world: World) -> None:
    case = CASES[name]
    port = free_port()
    args = [world.fmt(a.replace("{port}", str(port))) for a in case.args]
    before = snapshot(world.root)
    # A store that refuses connections must fail within seconds, not minutes of retries.
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "RAYKD_S3_TIMEOUT_S": "2",
           "RAYKD_CACHE": str(world.root.parent / "raykd-cache")}
    try:
        proc = raykd(args, env)
        after = snapshot(world.root)
    finally:  # what a failing case wrote must not fail the cases after it
        shutil.rmtree(world.runs, ignore_errors=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("raykd: error: "), proc.stderr[-3000:]
    assert case.names in lines[0] and case.words in lines[0], lines[0]
    assert after == before, f"a failed command wrote {sorted(set(after) - set(before))[:3]}"
