"""The update step on its own: the paper's skip rule, clipping, AdamW with warmup and the EMA, one call at a time.

No training run and no patched model: a NaN enters through the input images, a large gradient through a tiny
skip threshold. The oracles are a float64 recomputation of the gradient norm and the EMA's closed form.
"""

from __future__ import annotations

import copy

import pytest
import torch

from vdvae_fast.hparams import preset
from vdvae_fast.model import VAE
from vdvae_fast.runtime import Runtime, all_reduce_sum
from vdvae_fast.training import Learner, UpdateRule, make_learner, update_step

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def learner(**changes) -> tuple[Learner, UpdateRule]:
    H = preset("tiny")
    H.update({"backend": "reference", "warmup_iters": 4, "lr": 0.01, "ema_rate": 0.9, **changes})
    torch.manual_seed(0)
    return make_learner(VAE(H), H, CPU), UpdateRule.from_hparams(H)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (4, 8, 8, 3), generator=gen).float()
    return (pixels - 116.0) / 69.0, pixels / 127.5 - 1.0


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def float64_grad_norm(model: VAE, x: torch.Tensor, x_target: torch.Tensor, seed: int) -> float:
    """The gradient norm of the same loss (same noise), summed in float64 from a copy of the model."""
    twin = copy.deepcopy(model)
    torch.manual_seed(seed)
    twin(x, x_target)["elbo"].backward()
    return sum(p.grad.double().pow(2).sum() for p in twin.parameters()).sqrt().item()


def test_an_update_clips_steps_adamw_with_warmup_and_moves_the_ema():
    parts, rule = learner()
    x, x_target = batch()
    expected_norm = float64_grad_norm(parts.model, x, x_target, seed=1)
    before_model, before_ema = weights(parts.model), weights(parts.ema)
    torch.manual_seed(1)
    stats = update_step(parts, rule, x, x_target)

    assert stats["skipped_updates"] == 0 and stats["distortion_nans"] == stats["rate_nans"] == stats["stop"] == 0
    assert stats["grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
    assert stats["elbo"] == pytest.approx(stats["distortion"] + stats["rate"], rel=1e-6)
    assert stats["lr"] == 0.0 and parts.scheduler.get_last_lr()[0] == pytest.approx(0.01 / 4)  # warmup: 0, 1/4, ...
    clipped = sum(p.grad.double().pow(2).sum() for p in parts.model.parameters()).sqrt().item()
    assert clipped == pytest.approx(min(expected_norm, rule.grad_clip), rel=1e-5)
    after_model, after_ema = weights(parts.model), weights(parts.ema)
    assert all(torch.equal(before_model[n], v) for n, v in after_model.items())  # the warmup's first lr is 0
    for name, value in after_ema.items():  # ema = rate * ema + (1 - rate) * new weights
        torch.testing.assert_close(value, 0.9 * before_ema[name] + 0.1 * after_model[name], rtol=1e-6, atol=1e-7)
    torch.manual_seed(2)
    update_step(parts, rule, *batch(1))
    assert any(not torch.equal(after_model[n], v) for n, v in weights(parts.model).items())  # lr > 0 now


@pytest.mark.parametrize("poisoned", ["nan_images", "large_gradient"])
def test_a_skipped_update_changes_no_weight_and_is_counted(poisoned):
    parts, rule = learner(skip_threshold=1e-9 if poisoned == "large_gradient" else 400.0)
    x, x_target = batch()
    if poisoned == "nan_images":
        x = x * float("nan")
    before_model, before_ema = weights(parts.model), weights(parts.ema)
    torch.manual_seed(1)
    stats = update_step(parts, rule, x, x_target)

    assert stats["skipped_updates"] == 1
    assert stats["distortion_nans"] == float(poisoned == "nan_images")
    assert all(torch.equal(before_model[n], v) for n, v in weights(parts.model).items())
    assert all(torch.equal(before_ema[n], v) for n, v in weights(parts.ema).items())
    assert not parts.optimizer.state  # AdamW never stepped: no moments were created
    assert all(p.grad is None for p in parts.model.parameters())
    assert parts.scheduler.last_epoch == 1  # the schedule counts skipped updates, as VDVAE's does


def test_threshold_minus_one_never_skips_a_finite_gradient():
    parts, rule = learner(skip_threshold=-1)
    torch.manual_seed(1)
    assert update_step(parts, rule, *batch())["skipped_updates"] == 0


def test_the_stop_vote_and_the_fp16_loss_scale_are_reported():
    parts, rule = learner(precision="fp16")
    torch.manual_seed(1)
    stats = update_step(parts, rule, *batch(), stop=True)
    assert stats["stop"] == 1 and stats["loss_scale"] > 0


def test_a_single_process_all_reduce_returns_each_value_by_name():
    runtime = Runtime(rank=0, world_size=1, local_rank=0, device=CPU)
    values = {"b": torch.tensor(2.5), "a": 1.0, "flag": torch.tensor(True)}
    assert all_reduce_sum(values, runtime) == {"b": 2.5, "a": 1.0, "flag": 1.0}


@pytest.mark.parametrize("skip_threshold", [-1, 400.0, 1e30])
def test_a_nan_gradient_from_a_finite_loss_is_never_applied(skip_threshold):
    parts, rule = learner(skip_threshold=skip_threshold)
    first = next(parts.model.parameters())
    first.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite, one gradient does not
    before_model, before_ema = weights(parts.model), weights(parts.ema)
    torch.manual_seed(1)
    stats = update_step(parts, rule, *batch())

    assert stats["distortion_nans"] == stats["rate_nans"] == 0 and torch.isfinite(torch.tensor(stats["elbo"]))
    assert stats["skipped_updates"] == 1 and stats["grad_norm"] != stats["grad_norm"]  # NaN, reported as such
    assert all(torch.equal(before_model[n], v) for n, v in weights(parts.model).items())
    assert all(torch.equal(before_ema[n], v) for n, v in weights(parts.ema).items())
    assert not parts.optimizer.state


def test_an_infinite_gradient_norm_is_never_allowed():
    for threshold in (-1.0, 1e30):
        rule = UpdateRule(grad_clip=1.0, skip_threshold=threshold, ema_rate=0.9)
        assert not rule.allows(float("inf")) and not rule.allows(float("nan")) and rule.allows(1e3)
