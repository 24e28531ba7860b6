"""Build the student from the teacher's config, optionally initialised from its weights.

The student is the teacher's architecture with fewer/smaller layers, so it shares the
tokenizer and vocabulary and exports as an ordinary Hugging Face model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from raykd.student.config import StudentConfig

# `model.layers.12.` (Llama, Mistral, Qwen), `transformer.h.12.` (GPT-2), `layer.12.` (BERT)
_LAYER_KEY = re.compile(r"\.(layers|h|layer|blocks)\.(\d+)\.")


def student_config(teacher_config: Any, cfg: StudentConfig) -> Any:
    """The teacher's config with the student's sizes."""
    from transformers import AutoConfig

    values = teacher_config.to_dict()
    for drop in ("quantization_config", "_name_or_path", "architectures", "transformers_version"):
        values.pop(drop, None)
    values["num_hidden_layers"] = cfg.num_layers
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(cfg, name) is not None:
            values[name] = getattr(cfg, name)
    if cfg.hidden_size is not None and "head_dim" in values:
        heads = values.get("num_attention_heads") or teacher_config.num_attention_heads
        values["head_dim"] = cfg.hidden_size // heads
    values["use_cache"] = False
    return AutoConfig.for_model(**values)


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """Student layer i <- teacher layer round(i * (n_t - 1) / (n_s - 1)); first and last kept."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def build_student(teacher_config: Any, cfg: StudentConfig,
                  teacher_state: Mapping[str, torch.Tensor] | None = None) -> Any:
    """A randomly initialised student, or one seeded from `teacher_state` when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(student_config(teacher_config, cfg),
                                             dtype=torch.float32)
    if cfg.init_from_teacher:
        if teacher_state is None:
            raise ValueError("init_from_teacher needs the teacher's state dict")
        layers = cfg.init_layers or evenly_spaced(teacher_config.num_hidden_layers, cfg.num_layers)
        init_from_teacher(model, teacher_state, layers)
    return model


class MissingWeights(ValueError):
    """The teacher's weights, as given, have no tensor for some of the student's."""


def student_for(teacher_dir: str, cfg: StudentConfig) -> Any:
    """The student of the teacher in `teacher_dir`, seeded from its weights when
    cfg.init_from_teacher: only the tensors it copies are read from the teacher's files.
    Files that name tensors otherwise than the model does (a base-model checkpoint, or
    older names that transformers renames as it loads) fall back to the whole teacher."""
    from transformers import AutoConfig

    from raykd.teacher.loading import load_model, load_weights

    config = AutoConfig.from_pretrained(teacher_dir)
    if not cfg.init_from_teacher:
        return build_student(config, cfg)
    try:
        return build_student(config, cfg, load_weights(teacher_dir))
    except MissingWeights:
        whole = load_model(teacher_dir, "float32", "cpu").state_dict()
        return build_student(config, cfg, whole)


def init_from_teacher(student: Any, teacher_state: Mapping[str, torch.Tensor],
                      layers: list[int]) -> None:
    """Copy non-layer weights (embeddings, final norm, head) and teacher layer
    `layers[i]` into student layer i. Every student tensor must be found, same shape;
    a tied one (the head sharing the embedding's storage) may be absent, as it is from
    the files of a teacher with tied embeddings."""
    student_state = student.state_dict()
    absent = []
    copied: set[int] = set()
    with torch.no_grad():
        for key, value in student_state.items():
            match = _LAYER_KEY.search(key)
            if match:
                j = layers[int(match.group(2))]
                source = key[: match.start(2)] + str(j) + key[match.end(2):]
            else:
                source = key
            if source not in teacher_state:
                absent.append((source, value.data_ptr()))
                continue
            value.copy_(teacher_state[source].to(value.dtype))
            copied.add(value.data_ptr())
    missing = [source for source, ptr in absent if ptr not in copied]
    if missing:
        raise MissingWeights(f"teacher has no weights for {missing[:3]} ...")


def full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Gather a DeepSpeed engine's full fp32 weights; on rank 0 only, None elsewhere.

    Every rank must call it: under ZeRO-3 the parameters are gathered collectively.
    """
    import deepspeed
    import torch.distributed as dist

    module = engine.module
    params = list(module.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32).clone()
                for k, v in module.state_dict().items()}


def export(model_config: Any, state: dict[str, torch.Tensor], directory: str) -> None:
    """Save a loadable Hugging Face model (safetensors) from a full state dict."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.load_state_dict(state)
    model.config.use_cache = True
    model.save_pretrained(directory)
