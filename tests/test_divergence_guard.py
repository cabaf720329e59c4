"""The divergence guard under fp16 loss scaling, driven by a real torch GradScaler on CPU, step by step in the
order transformers' Trainer runs them (backward, unscale, gradient norm, on_pre_optimizer_step, scaler step and
update, on_step_end)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qlora_lab.sft import Diverged, QloraSFTTrainer


def guard(scaler: torch.amp.GradScaler | None, max_nonfinite_steps: int = 3) -> QloraSFTTrainer:
    """A QloraSFTTrainer holding only what the guard reads: the model, accelerate's scaler, the step counter."""
    trainer = QloraSFTTrainer.__new__(QloraSFTTrainer)
    trainer.model = torch.nn.Linear(4, 1)
    trainer.accelerator = SimpleNamespace(scaler=scaler)
    trainer.state = SimpleNamespace(global_step=0)
    trainer.max_nonfinite_steps = max_nonfinite_steps
    trainer._nonfinite_steps, trainer.skipped_updates, trainer._grad_norm = 0, 0, None
    trainer._step_loss_finite, trainer._step_grads_finite = True, True
    trainer._step_scale = trainer._streak_scale = None
    return trainer


def step(trainer: QloraSFTTrainer, optimizer, *, loss_nan: bool = False, overflow: bool = False) -> None:
    """One optimizer step. ``overflow``: the scaled fp16 gradients overflow (inf) under a finite loss."""
    scaler = trainer.accelerator.scaler
    loss = trainer.model(torch.ones(2, 4)).sum() * (float("nan") if loss_nan else 1.0)
    trainer.note_step_loss(loss)
    (scaler.scale(loss) if scaler else loss).backward()
    if overflow:
        trainer.model.weight.grad.fill_(float("inf"))
    if scaler:
        scaler.unscale_(optimizer)  # what accelerate's clip_grad_norm_ does first
    trainer._grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])
    trainer.drop_nonfinite_update()  # on_pre_optimizer_step
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad()
    trainer.state.global_step += 1
    trainer.check_step()  # on_step_end


def fp16_guard(init_scale: float = 2.0**16, max_nonfinite_steps: int = 3):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer = guard(scaler, max_nonfinite_steps)
    return trainer, torch.optim.SGD(trainer.model.parameters(), lr=0.1), scaler


def test_overflows_the_scaler_backs_off_from_do_not_stop_an_fp16_run():
    trainer, optimizer, scaler = fp16_guard()
    before = trainer.model.weight.detach().clone()
    for _ in range(6):  # a fresh scaler's usual start: several overflows in a row while the scale comes down
        step(trainer, optimizer, overflow=True)
    assert scaler.get_scale() == 2.0**10  # halved at each skipped step
    assert trainer.skipped_updates == 6 and torch.equal(trainer.model.weight, before)  # no update applied
    step(trainer, optimizer)  # then a finite step trains
    assert not torch.equal(trainer.model.weight, before) and trainer._nonfinite_steps == 0


def test_a_loss_still_non_finite_after_the_scale_backed_off_stops_the_run():
    trainer, optimizer, scaler = fp16_guard()
    step(trainer, optimizer, loss_nan=True)  # the scaler backs off: not counted yet
    step(trainer, optimizer, loss_nan=True)
    step(trainer, optimizer, loss_nan=True)
    with pytest.raises(Diverged, match="not finite for 3 consecutive steps"):
        step(trainer, optimizer, loss_nan=True)
    assert scaler.get_scale() < 2.0**16


def test_overflows_at_the_scale_floor_count():
    trainer, optimizer, _ = fp16_guard(init_scale=1.0)
    step(trainer, optimizer, overflow=True)
    step(trainer, optimizer, overflow=True)
    with pytest.raises(Diverged):
        step(trainer, optimizer, overflow=True)


def test_a_finite_step_resets_the_count():
    trainer, optimizer, _ = fp16_guard()
    for _ in range(3):
        step(trainer, optimizer, loss_nan=True)  # counted: 0, 1, 2
        step(trainer, optimizer)
    assert trainer._nonfinite_steps == 0


def test_without_a_scaler_every_non_finite_step_counts():
    trainer = guard(None)
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    step(trainer, optimizer, overflow=True)
    step(trainer, optimizer, loss_nan=True)
    with pytest.raises(Diverged):
        step(trainer, optimizer, overflow=True)
