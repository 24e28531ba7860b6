"""The chunked LM head + loss against the full-logits loss: same values, same gradients."""

from __future__ import annotations

import pytest
import torch

from raykd.data.soft_labels import SoftLabels
from raykd.student.head_loss import StudentLoss, chunked_distill_loss
from raykd.student.losses import distill_loss, tail_log_mass


def _tiny_lm(vocab: int = 97, hidden: int = 32, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def _batch(vocab: int, k: int | None, B: int = 3, L: int = 9, T: float = 2.0):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (B, L), generator=g)
    length = torch.tensor([L, 4, 0][:B])  # a full row, a padded row, an empty row
    z = torch.randn(B, L, vocab, generator=g) * 3 / T
    if k is None:
        return input_ids, length, SoftLabels(None, torch.log_softmax(z, -1))
    top, ids = z.topk(k, -1)
    log_p = top - torch.logsumexp(z, -1, keepdim=True)
    return input_ids, length, SoftLabels(ids, log_p, tail_log_mass(log_p))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k", [8, None], ids=["top-k", "full-vocab"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_chunked_equals_full_logits_values_and_gradients(k, alpha, chunk_rows):
    model = _tiny_lm()
    input_ids, length, labels = _batch(97, k)
    T = 2.0

    logits = model(input_ids=input_ids).logits
    ref = distill_loss(logits, input_ids, length, labels.topk_ids, labels.log_p, alpha=alpha,
                       temperature=T, teacher_log_tail=labels.log_tail)
    ref.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad()

    out = model(input_ids=input_ids, output_hidden_states=True,
                logits_to_keep=torch.empty(0, dtype=torch.long))
    got = chunked_distill_loss(out.hidden_states[-1], model.lm_head.weight, input_ids, length,
                               labels, alpha=alpha, temperature=T, chunk_rows=chunk_rows)
    got.loss.backward()
    for name in ("loss", "kd", "ce", "tokens"):
        torch.testing.assert_close(getattr(got, name).detach(), getattr(ref, name).detach(),
                                   atol=1e-5, rtol=1e-5, msg=name)
    assert float(got.tokens) == 8 + 3
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()  # every parameter, the tied head included
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_empty_batch_is_zero_loss_with_zero_gradients_everywhere():
    # A rank out of data trains a length-0 row: every parameter must still get a gradient
    # (zeros), or DeepSpeed's gradient reduction waits for it.
    model = _tiny_lm()
    input_ids, _, labels = _batch(97, 8, B=1)
    loss_fn = StudentLoss(model, 97, alpha=0.5, temperature=1.0)
    parts = loss_fn(input_ids, torch.zeros(1, dtype=torch.long), labels)
    parts.loss.backward()
    assert loss_fn.chunked is True
    assert float(parts.loss.detach()) == 0.0 and float(parts.tokens) == 0.0
    grads = _grads(model)
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.all(g == 0) for g in grads.values())


def test_student_loss_eval_matches_and_reports_kd_for_ce_only_runs():
    model = _tiny_lm()
    model.eval()
    input_ids, length, labels = _batch(97, 8)
    chunked = StudentLoss(model, 97, alpha=0.0, temperature=2.0)
    full = StudentLoss(model, 97, alpha=0.0, temperature=2.0, chunked=False)
    with torch.no_grad():
        a = chunked(input_ids, length, labels, with_kd=True)
        b = full(input_ids, length, labels, with_kd=True)
    assert chunked.chunked is True and full.chunked is False
    assert float(a.kd) > 0
    for name in ("loss", "kd", "ce"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)


def test_vocab_cut_and_untied_head():
    model = _tiny_lm(tied=False)
    input_ids, length, labels = _batch(90, 8)  # labels over the first 90 ids only
    input_ids = input_ids % 90
    a = StudentLoss(model, 90, alpha=0.5, temperature=1.0)(input_ids, length, labels)
    b = StudentLoss(model, 90, alpha=0.5, temperature=1.0, chunked=False)(input_ids, length,
                                                                          labels)
    torch.testing.assert_close(a.loss.detach(), b.loss.detach(), atol=1e-5, rtol=1e-5)


def test_a_head_that_is_not_hidden_times_weight_falls_back_to_full_logits():
    model = _tiny_lm()
    original = model.forward

    def scaled(*args, **kwargs):  # a scaled head, as Cohere's models have
        out = original(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    input_ids, length, labels = _batch(97, 8)
    loss_fn = StudentLoss(model, 97, alpha=0.5, temperature=1.0)
    parts = loss_fn(input_ids, length, labels)
    assert loss_fn.chunked is False
    ref = distill_loss(scaled(input_ids=input_ids).logits, input_ids, length, labels.topk_ids,
                       labels.log_p, alpha=0.5, temperature=1.0, teacher_log_tail=labels.log_tail)
    torch.testing.assert_close(parts.loss, ref.loss)


def _one_process_group(port: int) -> None:
    import os

    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")


def _in_subprocess(tmp_path, call: str) -> dict:
    """`call` (a function of this module, given a free port as `port`) in a process of its
    own: DeepSpeed's process group is set up once per process. Returns what it returned."""
    import subprocess
    import sys

    from tests.ports import free_ports

    out = tmp_path / f"result-{len(list(tmp_path.glob('result-*')))}.pt"
    code = (f"import torch; from tests.test_head_loss import *; port = {free_ports(1)[0]}; "
            f"torch.save({call}, {str(out)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def engine_steps(zero_stage: int, chunked: bool, port: int, forced: bool = True) -> dict:
    """Two optimiser steps of a tiny student in a 1-process DeepSpeed engine (gloo); the
    parameters after them, which path StudentLoss took and the stage the engine ran.
    `forced`: run `zero_stage` itself, not the stage raykd picks for one worker."""
    import deepspeed

    from raykd.student.config import TrainConfig
    from raykd.student.model import full_state_dict
    from raykd.student.optim import deepspeed_config

    _one_process_group(port)
    model = _tiny_lm()
    train = TrainConfig(zero_stage=zero_stage, batch_size=3, micro_batch_size=3, lr=1e-2)
    config = deepspeed_config(train, 1)
    if forced:
        config["zero_optimization"]["stage"] = zero_stage
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(
        model.parameters(), lr=1e-2), config=config)
    loss_fn = StudentLoss(engine, 97, alpha=0.5, temperature=2.0, chunked=chunked)
    input_ids, length, labels = _batch(97, 8)
    for _ in range(2):
        parts = loss_fn(input_ids, length, labels)
        engine.backward(parts.loss)
        engine.step()
    return {"chunked": loss_fn.chunked, "state": full_state_dict(engine),
            "stage": engine.zero_optimization_stage()}


def _engine_steps_in_subprocess(tmp_path, zero_stage: int, chunked: bool = True,
                                forced: bool = True) -> dict:
    return _in_subprocess(tmp_path, f"engine_steps({zero_stage}, {chunked}, port, {forced})")


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_engine_trains_the_same_chunked_or_not(tmp_path, zero_stage):
    # Through the engine (its forward hooks, ZeRO's gradient reduction and partitioning):
    # ZeRO-2 takes the chunked path and ends where full logits end; ZeRO-3, whose head
    # weight lives partitioned outside the head's forward, falls back to full logits.
    results = {chunked: _engine_steps_in_subprocess(tmp_path, zero_stage, chunked)
               for chunked in (True, False)}
    assert results[True]["stage"] == zero_stage
    assert results[True]["chunked"] is (zero_stage < 3)
    assert results[False]["chunked"] is False
    a, b = results[True]["state"], results[False]["state"]
    assert a.keys() == b.keys()
    start = _tiny_lm().state_dict()
    assert all(not torch.allclose(a[n], start[n]) for n in a if "proj" in n)  # it trained
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_one_worker_runs_zero_2_as_stage_0_to_the_same_weights(tmp_path):
    # ZeRO-1/2 split optimiser state and gradients across ranks: with one rank raykd runs
    # stage 0 (no flat fp32 copy of the weights); the training must not change with it.
    from raykd.student.config import TrainConfig
    from raykd.student.optim import zero_stage

    assert [zero_stage(TrainConfig(zero_stage=s), 1) for s in range(4)] == [0, 0, 0, 3]
    assert [zero_stage(TrainConfig(zero_stage=s), 2) for s in range(4)] == [0, 1, 2, 3]
    picked = _engine_steps_in_subprocess(tmp_path, 2, forced=False)
    zero2 = _engine_steps_in_subprocess(tmp_path, 2, forced=True)
    assert (picked["stage"], zero2["stage"]) == (0, 2)
    start = _tiny_lm().state_dict()
    assert all(not torch.allclose(picked["state"][n], start[n]) for n in start if "proj" in n)
    for name in zero2["state"]:
        torch.testing.assert_close(picked["state"][name], zero2["state"][name], atol=1e-6,
                                   rtol=1e-5, msg=name)


def checkpoint_round_trip(directory: str, port: int) -> dict:
    """A one-worker engine (the stage raykd picks: 0) saved after 2 steps and restored
    into a fresh engine through raykd's checkpoint code; the next step of each."""
    import deepspeed

    from raykd.student import checkpoint as ckpt
    from raykd.student.config import TrainConfig
    from raykd.student.ledger import Ledger
    from raykd.student.model import full_state_dict
    from raykd.student.optim import deepspeed_config

    _one_process_group(port)
    train = TrainConfig(zero_stage=2, batch_size=3, micro_batch_size=3, lr=1e-2)
    input_ids, length, labels = _batch(97, 8)

    def engine():  # noqa: ANN202
        model = _tiny_lm()  # the untrained weights: the fresh engine differs until restored
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        e, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                     config=deepspeed_config(train, 1))
        return e, StudentLoss(e, 97, alpha=0.5, temperature=2.0)

    def step(e, loss_fn) -> None:  # noqa: ANN001
        parts = loss_fn(input_ids, length, labels)
        e.backward(parts.loss)
        e.step()

    first, loss_fn = engine()
    for _ in range(2):
        step(first, loss_fn)
    ckpt.save(first, ckpt.Progress(Ledger(4), step=2), directory, 0, "r")
    second, loss_fn2 = engine()
    progress = ckpt.restore(second, directory)
    step(first, loss_fn)
    step(second, loss_fn2)
    return {"stage": second.zero_optimization_stage(), "step": progress.step,
            "first": full_state_dict(first), "second": full_state_dict(second)}


def test_one_worker_checkpoint_resumes_to_the_same_weights(tmp_path):
    # The quickstart's path (one worker, so stage 0): what a resume restores - weights and
    # AdamW's moments, loaded by raykd's weights-only loader - gives the same next step.
    got = _in_subprocess(tmp_path, f"checkpoint_round_trip({str(tmp_path / 'ckpt')!r}, port)")
    assert (got["stage"], got["step"]) == (0, 2)
    for name in got["first"]:
        torch.testing.assert_close(got["second"][name], got["first"][name], msg=name)
