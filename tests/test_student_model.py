"""Building the student from the teacher's config, and DistilBERT-style init."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from raykd.student.config import StudentConfig
from raykd.student.model import build_student, evenly_spaced


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
