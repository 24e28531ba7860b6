"""Building the student from the teacher's config, and DistilBERT-style init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from raykd.student.config import StudentConfig
from raykd.student.model import build_student, evenly_spaced, student_for
from raykd.teacher.loading import load_weights


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(30, 4) == [0, 10, 19, 29]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(12, 1) == [11]


def test_student_shrinks_the_teacher(tiny_teacher):
    cfg = AutoConfig.from_pretrained(tiny_teacher)
    s = build_student(cfg, StudentConfig(num_layers=2, hidden_size=32, intermediate_size=48,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert s.config.num_hidden_layers == 2 and s.config.hidden_size == 32
    assert s.config.vocab_size == cfg.vocab_size
    out = s(torch.randint(0, cfg.vocab_size, (1, 5))).logits
    assert out.shape == (1, 5, cfg.vocab_size)


def test_init_from_teacher_copies_the_chosen_layers(tiny_teacher):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    state = teacher.state_dict()
    s = build_student(teacher.config, StudentConfig(num_layers=2, init_from_teacher=True,
                                                    init_layers=[3, 1]), state)
    ss = s.state_dict()
    assert torch.equal(ss["model.layers.0.self_attn.q_proj.weight"],
                       state["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(ss["model.layers.1.mlp.down_proj.weight"],
                       state["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(ss["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(ss["model.norm.weight"], state["model.norm.weight"])


def test_full_copy_reproduces_the_teacher(tiny_teacher):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    n = teacher.config.num_hidden_layers
    s = build_student(teacher.config, StudentConfig(num_layers=n, init_from_teacher=True),
                      teacher.state_dict()).eval()
    x = torch.randint(0, teacher.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(s(x).logits, teacher(x).logits)


def _count_reads(weights, monkeypatch) -> list[str]:
    """The names of the tensors read from `weights`'s files, in order (every read)."""
    from safetensors import safe_open

    reads: list[str] = []

    class Counting:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            reads.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr("safetensors.safe_open", Counting)
    return reads


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_init_from_teacher_files_reads_only_the_chosen_layers(tiny_teacher, tmp_path, layout,
                                                            monkeypatch):
    # The teacher as it is saved (tied embeddings: no lm_head tensor in its files), in one
    # safetensors file, in shards with an index, or as a PyTorch .bin (loaded whole).
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    if layout == "single":
        directory = tiny_teacher
    elif layout == "sharded":
        directory = tmp_path / layout
        teacher.save_pretrained(directory, max_shard_size="100KB")
    else:  # transformers saves safetensors only; an older .bin checkpoint, by hand
        directory = tmp_path / layout
        directory.mkdir()
        teacher.config.save_pretrained(directory)
        torch.save(teacher.state_dict(), directory / "pytorch_model.bin")
    names = sorted(p.name for p in Path(directory).iterdir())
    assert ("model.safetensors.index.json" in names) == (layout == "sharded")
    weights = load_weights(str(directory))
    assert isinstance(weights, dict) == (layout == "bin")
    reads = _count_reads(weights, monkeypatch)
    cfg = StudentConfig(num_layers=2, init_from_teacher=True, init_layers=[3, 1])
    s = build_student(teacher.config, cfg, weights).state_dict()
    whole = build_student(teacher.config, cfg, teacher.state_dict()).state_dict()
    assert s.keys() == whole.keys()
    for key in s:
        assert torch.equal(s[key], whole[key]), key
    assert torch.equal(s["lm_head.weight"], s["model.embed_tokens.weight"])  # still tied
    if layout != "bin":
        # Each tensor the student copies is read once, and no other: not layers 0 and 2.
        assert len(reads) == len(set(reads))
        assert {int(k.split(".")[2]) for k in reads if ".layers." in k} == {1, 3}
        assert {k for k in reads if ".layers." not in k} == {"model.embed_tokens.weight",
                                                              "model.norm.weight"}


def test_init_from_teacher_names_a_missing_weight(tiny_teacher):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    state = {k: v for k, v in teacher.state_dict().items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        build_student(teacher.config, StudentConfig(num_layers=2, init_from_teacher=True), state)


@pytest.mark.parametrize("checkpoint", ["causal_lm", "base_model"])
def test_student_for_a_teacher_directory(tiny_teacher, tmp_path, checkpoint):
    # A base-model checkpoint names its tensors without the causal LM's "model." prefix:
    # the lazy read finds none of the student's names and the teacher is loaded whole
    # (transformers maps the names); either way the student is the same.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    directory = tiny_teacher
    if checkpoint == "base_model":
        directory = tmp_path / "base"
        teacher.model.save_pretrained(directory)
        assert not any(k.startswith("model.") for k in load_weights(str(directory)))
    cfg = StudentConfig(num_layers=2, init_from_teacher=True, init_layers=[3, 1])
    s = student_for(str(directory), cfg).state_dict()
    whole = build_student(teacher.config, cfg, teacher.state_dict()).state_dict()
    assert s.keys() == whole.keys()
    for key in s:
        assert torch.equal(s[key], whole[key]), key
