"""The training switches of Efficient-VDVAE, NVAE and the Ladder VAE, and the skip watchdog.

Oracles: the schedules' closed forms evaluated by hand; Adamax's update rule written out in float64; the KL
warm-up's and the spectral term's gradients recomputed on a copy of the model; torch.linalg.matrix_norm for
the largest singular values; and, for the defaults, the update as it was written before the switches existed.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdvae_fast import train
from vdvae_fast.checkpoint import CheckpointError, load_checkpoint
from vdvae_fast.hparams import preset, validate
from vdvae_fast.model import VAE
from vdvae_fast.training import UpdateRule, make_learner, make_optimizer, update_step
from vdvae_fast.training.schedules import learning_rate
from vdvae_fast.training.spectral import SpectralNorms
from vdvae_fast.training.watchdog import SkipWatchdog, StalledRunError

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------

SCHEDULE = dict(lr=1e-3, warmup_iters=100, lr_decay_start=1000, lr_decay_steps=2000, lr_min=2e-4, lr_decay_rate=0.5)
QUARTER_COSINE = 2e-4 + 8e-4 * (1 + math.cos(math.pi / 4)) / 2  # a quarter of the way through the decay

# (schedule, step, learning rate): warm-up 100, decay from step 1000 over 2000 steps to 2e-4, rate 0.5
SCHEDULE_VALUES = [
    ("linear_warmup", 0, 0.0), ("linear_warmup", 50, 5e-4), ("linear_warmup", 100, 1e-3),
    ("linear_warmup", 10**6, 1e-3),
    ("cosine", 0, 0.0), ("cosine", 50, 5e-4), ("cosine", 999, 1e-3), ("cosine", 1000, 1e-3),
    ("cosine", 1500, QUARTER_COSINE), ("cosine", 2000, 6e-4), ("cosine", 3000, 2e-4), ("cosine", 10**6, 2e-4),
    ("exponential", 50, 5e-4), ("exponential", 1000, 1e-3), ("exponential", 3000, 5e-4),
    ("exponential", 5000, 2.5e-4), ("exponential", 7000, 2e-4), ("exponential", 10**6, 2e-4),
    ("noam", 0, 0.0), ("noam", 25, 2.5e-4), ("noam", 100, 1e-3), ("noam", 400, 5e-4), ("noam", 10**4, 1e-4),
]  # fmt: skip


def schedule_hparams(schedule: str, **changes):
    H = preset("tiny")
    H.update({**SCHEDULE, "lr_schedule": schedule, **changes})
    return H


@pytest.mark.parametrize("schedule, step, expected", SCHEDULE_VALUES)
def test_each_schedule_takes_its_closed_form_value_at_chosen_steps(schedule, step, expected):
    H = schedule_hparams(schedule)
    validate(H)
    assert learning_rate(step, H) == pytest.approx(expected, rel=1e-12, abs=1e-18)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
@pytest.mark.parametrize("schedule", ["linear_warmup", "cosine", "exponential", "noam"])
def test_the_learners_schedule_gives_each_update_the_rate_of_its_step(schedule):
    H = schedule_hparams(schedule, lr_decay_start=100, lr_decay_steps=40, warmup_iters=20)
    learner = make_learner(VAE(H), H, CPU)
    for step in range(200):
        assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(step, H), rel=1e-12, abs=1e-18)
        learner.scheduler.step()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(lr_schedule="noam", warmup_iters=0), "--lr_schedule noam peaks at update warmup_iters"),
        (dict(lr_schedule="cosine", warmup_iters=200, lr_decay_start=100), "use --lr_decay_start 200 or more"),
        (dict(lr_schedule="exponential", lr_min=2e-3), "--lr_min 0.002 is the floor .* at most --lr 0.001"),
    ],
)
def test_a_schedule_whose_fields_disagree_is_refused(changes, message):
    H = schedule_hparams("linear_warmup", **changes)
    with pytest.raises(ValueError, match=message):
        validate(H)


# --------------------------------------------------------------------------------------------
# Adamax
# --------------------------------------------------------------------------------------------


def adamax_steps(optimizer_for, grads, start):
    param = torch.nn.Parameter(start.clone())
    optimizer = optimizer_for([param])
    trajectory = []
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        trajectory.append(param.detach().clone())
    return optimizer, trajectory


ADAMAX_GRADS = [torch.tensor(g, dtype=torch.float64) for g in ([1.0, -3.0, 0.0], [-2.0, 0.5, 4.0], [0.1, 0.2, -0.3])]
ADAMAX_START = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)


def test_adamax_without_weight_decay_is_torchs_own():
    H = preset("tiny")
    H.update(optimizer="adamax", lr=0.01, adam_beta1=0.9, adam_beta2=0.999, wd=0.0)
    mine, ours = adamax_steps(lambda p: make_optimizer(p, H, CPU), ADAMAX_GRADS, ADAMAX_START)
    torchs = adamax_steps(lambda p: torch.optim.Adamax(p, lr=0.01, betas=(0.9, 0.999)), ADAMAX_GRADS, ADAMAX_START)[1]
    assert isinstance(mine, torch.optim.Adamax) and all(torch.equal(a, b) for a, b in zip(ours, torchs, strict=True))


def test_adamax_decays_the_weights_decoupled_and_steps_as_its_rule_says():
    H = preset("tiny")
    H.update(optimizer="adamax", lr=0.01, adam_beta1=0.9, adam_beta2=0.999, wd=0.1)
    trajectory = adamax_steps(lambda p: make_optimizer(p, H, CPU), ADAMAX_GRADS, ADAMAX_START)[1]
    p, m, u = ADAMAX_START.clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t, (g, got) in enumerate(zip(ADAMAX_GRADS, trajectory, strict=True), start=1):
        m = 0.9 * m + 0.1 * g
        u = torch.maximum(0.999 * u, g.abs() + 1e-8)
        p = p * (1 - 0.01 * 0.1) - 0.01 / (1 - 0.9**t) * m / u  # Efficient-VDVAE: the decay after the direction
        torch.testing.assert_close(got, p, rtol=1e-12, atol=1e-15)


def test_the_default_optimizer_stays_adamw():
    H = preset("tiny")
    assert type(make_optimizer([torch.nn.Parameter(torch.zeros(2))], H, CPU)) is torch.optim.AdamW


# --------------------------------------------------------------------------------------------
# KL warm-up and spectral regularization in the update
# --------------------------------------------------------------------------------------------


def learner_and_rule(**changes):
    H = preset("tiny")
    H.update({"backend": "reference", "lr": 0.01, "ema_rate": 0.9, **changes})
    torch.manual_seed(0)
    return make_learner(VAE(H), H, CPU), UpdateRule.from_hparams(H), H


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (4, 8, 8, 3), generator=gen).float()
    return (pixels - 116.0) / 69.0, pixels / 127.5 - 1.0


def float64_norm(model: torch.nn.Module) -> float:
    return sum(p.grad.double().pow(2).sum() for p in model.parameters()).sqrt().item()


def test_kl_warmup_beta_rises_linearly_from_its_start_to_one():
    rule = UpdateRule(1.0, -1, 0.9, kl_warmup_start=0.2, kl_warmup_iters=4)
    assert [rule.kl_beta(step) for step in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0])
    assert UpdateRule(1.0, -1, 0.9).kl_beta(0) == 1.0


def test_kl_warmup_backpropagates_distortion_plus_beta_rate_and_reports_the_true_elbo():
    learner, rule, _ = learner_and_rule(kl_warmup_iters=4, kl_warmup_start=0.2)
    for step, seed in enumerate((1, 2)):
        x, x_target = batch(seed)
        twin = copy.deepcopy(learner.model)
        torch.manual_seed(seed)
        out = twin(x, x_target)
        beta = 0.2 + 0.2 * step
        (out["distortion"] + beta * out["rate"]).backward()
        torch.manual_seed(seed)
        stats = update_step(learner, rule, x, x_target)
        assert stats["kl_beta"] == pytest.approx(beta)
        assert stats["grad_norm"] == pytest.approx(float64_norm(twin), rel=1e-5)
        assert stats["elbo"] == pytest.approx(stats["distortion"] + stats["rate"], rel=1e-6)
        assert stats["elbo"] == pytest.approx(out["elbo"].item(), rel=1e-6)


def conv_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.weight": module.weight.detach().reshape(module.weight.shape[0], -1).double()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d)
    }


def test_the_spectral_estimate_converges_to_each_weights_largest_singular_value():
    torch.manual_seed(0)
    model = VAE(preset("tiny"))
    norms = SpectralNorms(model, power_iters=30)
    total = norms.penalty()
    vectors = norms.state_dict()
    exact = {name: torch.linalg.matrix_norm(w, ord=2).item() for name, w in conv_matrices(model).items()}
    assert len(vectors) == 2 * len(exact) and any(value == 0 for value in exact.values())  # zero-initialized convs
    for name, w in conv_matrices(model).items():
        u, v = vectors[f"{name}.u"].double(), vectors[f"{name}.v"].double()
        assert torch.linalg.vector_norm(u).item() == pytest.approx(1.0) and torch.isfinite(v).all()
        assert (u @ w @ v).item() == pytest.approx(exact[name], rel=1e-5, abs=1e-7), name
    assert total.item() == pytest.approx(sum(exact.values()), rel=1e-5)


def test_the_spectral_gradient_is_u_v_transposed_and_the_vectors_persist():
    torch.manual_seed(0)
    model = VAE(preset("tiny"))
    norms = SpectralNorms(model, power_iters=2, seed=3)
    norms.penalty()
    saved = {name: value.clone() for name, value in norms.state_dict().items()}
    restored = SpectralNorms(model, power_iters=2, seed=99)
    restored.load_state_dict(saved)
    (3.0 * norms.penalty()).backward()
    vectors = norms.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            expected = 3.0 * torch.outer(vectors[f"{name}.weight.u"], vectors[f"{name}.weight.v"])
            torch.testing.assert_close(module.weight.grad, expected.reshape(module.weight.shape))
    with torch.no_grad():
        restored.penalty()  # the same two iterations from the same saved vectors, not ten times as many
    assert all(torch.equal(vectors[name], value) for name, value in restored.state_dict().items())
    with pytest.raises(ValueError, match=re.escape("expected shape")):
        restored.load_state_dict({name: value[:1] for name, value in saved.items()})


def test_spectral_regularization_adds_lambda_times_the_estimate_to_the_loss():
    learner, rule, H = learner_and_rule(spectral_reg=0.05, spectral_power_iters=3)
    twin = copy.deepcopy(learner.model)
    twin_norms = SpectralNorms(twin, 3, H.seed)  # the same seed: the same initial vectors and iterations
    x, x_target = batch(1)
    torch.manual_seed(1)
    penalty = twin_norms.penalty()
    (twin(x, x_target)["elbo"] + 0.05 * penalty).backward()
    torch.manual_seed(1)
    stats = update_step(learner, rule, x, x_target)
    assert stats["spectral_norm_sum"] == pytest.approx(penalty.item(), rel=1e-6)
    assert stats["grad_norm"] == pytest.approx(float64_norm(twin), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Every switch off: the update of before the switches, bit for bit
# --------------------------------------------------------------------------------------------


def update_before_the_switches(model, ema, optimizer, scheduler, rule, x, x_target):
    """The update as it was written before the switches (AdamW, VDVAE's warm-up, the negative ELBO)."""
    optimizer.zero_grad(set_to_none=True)
    out = model(x, x_target)
    out["elbo"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), rule.grad_clip).item()
    skipped = not (math.isfinite(out["elbo"].item()) and rule.allows(grad_norm))
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - rule.ema_rate)
    scheduler.step()
    return out["elbo"].item(), grad_norm


def test_with_every_switch_off_demo_updates_are_bit_identical_to_the_update_before_the_switches():
    H = preset("demo")
    H.update(backend="reference")
    torch.manual_seed(0)
    learner = make_learner(VAE(H), H, CPU)
    model, ema = copy.deepcopy(learner.model), copy.deepcopy(learner.ema)
    adamw = dict(lr=H.lr, betas=(0.9, 0.9), eps=1e-8, weight_decay=H.wd, foreach=True)
    optimizer = torch.optim.AdamW(model.parameters(), **adamw)
    warmup = float(H.warmup_iters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 if i > warmup else i / warmup)
    rule = UpdateRule.from_hparams(H)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        pixels = torch.randint(0, 256, (8, 16, 16, 3), generator=gen).float()
        x, x_target = (pixels - 116.0) / 69.0, pixels / 127.5 - 1.0
        torch.manual_seed(step)
        stats = update_step(learner, rule, x, x_target)
        torch.manual_seed(step)
        elbo, grad_norm = update_before_the_switches(model, ema, optimizer, scheduler, rule, x, x_target)
        assert (stats["elbo"], stats["grad_norm"]) == (elbo, grad_norm)
        assert set(stats) == {"elbo", "distortion", "rate", "grad_norm", "distortion_nans", "rate_nans",
                              "skipped_updates", "lr", "stop"}  # fmt: skip
    for mine, theirs in ((learner.model, model), (learner.ema, ema)):
        expected = theirs.state_dict()
        assert all(torch.equal(value, expected[name]) for name, value in mine.state_dict().items())


# --------------------------------------------------------------------------------------------
# The skip watchdog and the switches in the training program
# --------------------------------------------------------------------------------------------


def test_the_watchdog_fires_after_every_k_consecutive_skips():
    watchdog = SkipWatchdog(iters=2)
    fired = [watchdog.observe(skipped) for skipped in (True, True, True, False, True, True, True, True)]
    assert fired == [False, True, False, False, False, True, False, True]
    assert not any(SkipWatchdog(iters=0).observe(True) for _ in range(5))


def write_pngs(root: Path, count: int = 40) -> Path:
    rng = np.random.RandomState(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def run_argv(tmp_path: Path, desc: str, *extra: str) -> list[str]:
    """The tiny preset on 36 training PNGs of 8x8 (9 batches of 4), a train_loss record every update."""
    data = tmp_path / "pngs"
    if not data.exists():
        write_pngs(data)
    return ["--hps", "tiny", "--dataset", "folder", "--image_size", "8", "--data_root", str(data), "--device", "cpu",
            "--save_dir", str(tmp_path / "runs"), "--desc", desc, "--iters_per_print", "1", "--iters_per_images",
            "100000", "--iters_per_save", "100000", "--num_images_visualize", "0", *extra]  # fmt: skip


def records(tmp_path: Path, desc: str, kind: str) -> list[dict]:
    lines = (tmp_path / "runs" / desc / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == kind]


def skipping(action: str, *extra: str) -> list[str]:
    """Every update skipped (threshold 1e-9) until the watchdog acts, which it does after 2 in a row."""
    return ["--skip_threshold", "1e-9", "--skip_watchdog_iters", "2", "--skip_watchdog_action", action, *extra]


def test_the_watchdog_warns_and_logs_the_count_and_threshold(tmp_path):
    summary = train.run(train.parse_args(run_argv(tmp_path, "warn", "--max_iters", "5", *skipping("warn"))))
    assert summary["skipped_updates"] == 5
    losses = records(tmp_path, "warn", "train_loss")
    assert [r["consecutive_skips"] for r in losses] == [1, 2, 3, 4, 5]
    assert all(r["skip_threshold"] == 1e-9 for r in losses)
    fired = records(tmp_path, "warn", "skip_watchdog")
    assert [(r["step"], r["consecutive_skips"], r["action"]) for r in fired] == [(2, 2, "warn"), (4, 4, "warn")]
    assert "warning: the last 2 updates were all skipped" in (tmp_path / "runs" / "warn" / "log.txt").read_text()


def test_the_watchdog_raises_the_threshold_and_the_run_goes_on(tmp_path):
    argv = run_argv(tmp_path, "raise", "--max_iters", "4", *skipping("raise_threshold"))
    summary = train.run(train.parse_args([*argv, "--skip_watchdog_threshold_factor", "1e12"]))
    losses = records(tmp_path, "raise", "train_loss")
    assert [r["skipped_updates"] for r in losses] == [1, 1, 0, 0] and summary["skipped_updates"] == 2
    # each record holds the threshold its updates were judged by
    assert [r["skip_threshold"] for r in losses] == pytest.approx([1e-9, 1e-9, 1e3, 1e3])
    saved = load_checkpoint(tmp_path / "runs" / "raise" / "latest.pt")["trainer_state"]["skip_threshold"]
    assert saved == pytest.approx(1e3)


def test_the_watchdog_lowers_the_learning_rate(tmp_path):
    train.run(train.parse_args(run_argv(tmp_path, "lower", "--max_iters", "5", "--lr", "0.001", *skipping("lower_lr"))))
    assert [r["lr"] for r in records(tmp_path, "lower", "train_loss")] == pytest.approx(
        [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    )


def test_the_watchdog_stops_with_a_checkpoint_and_a_message(tmp_path):
    with pytest.raises(StalledRunError) as stalled:
        train.run(train.parse_args(run_argv(tmp_path, "stop", "--max_iters", "50", *skipping("stop"))))
    message = str(stalled.value)
    assert "after 2 consecutive skipped updates at step 2" in message and "skip_threshold 1e-09" in message
    assert "Try a higher --skip_threshold" in message and "--restore_path" in message
    state = load_checkpoint(tmp_path / "runs" / "stop" / "latest.pt")
    assert state["step"] == 2 and state["skipped_updates"] == 2 and state["trainer_state"]["consecutive_skips"] == 2


SWITCHES = ["--optimizer", "adamax", "--lr", "0.001", "--lr_schedule", "cosine", "--warmup_iters", "2",
            "--lr_decay_start", "3", "--lr_decay_steps", "4", "--lr_min", "1e-4", "--kl_warmup_iters", "5",
            "--kl_warmup_start", "0.1", "--spectral_reg", "0.01", "--spectral_power_iters", "2"]  # fmt: skip


def test_a_run_with_the_switches_resumes_bit_for_bit(tmp_path):
    """The optimizer, the schedule, beta and the spectral vectors all continue where the checkpoint left them."""
    train.run(train.parse_args(run_argv(tmp_path, "whole", "--max_iters", "6", *SWITCHES)))
    train.run(train.parse_args(run_argv(tmp_path, "parts", "--max_iters", "3", *SWITCHES)))
    latest = str(tmp_path / "runs" / "parts" / "latest.pt")
    train.run(train.parse_args(run_argv(tmp_path, "parts", "--max_iters", "6", *SWITCHES, "--restore_path", latest)))

    whole, parts = records(tmp_path, "whole", "train_loss"), records(tmp_path, "parts", "train_loss")
    keys = ("step", "elbo", "grad_norm", "lr", "kl_beta", "spectral_norm_sum")
    assert [[r[k] for k in keys] for r in parts] == [[r[k] for k in keys] for r in whole]
    assert [r["kl_beta"] for r in whole] == pytest.approx([0.1, 0.28, 0.46, 0.64, 0.82, 1.0])
    assert [r["lr"] for r in whole] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-4 + 9e-4 * (1 + 0.5**0.5) / 2, 5.5e-4])
    state = load_checkpoint(tmp_path / "runs" / "parts" / "latest.pt")
    assert "exp_inf" in state["optimizer"]["state"][0]  # Adamax's infinity norm
    convs = [name for name, value in state["model"].items() if name.endswith(".weight") and value.dim() == 4]
    assert sorted(state["trainer_state"]["spectral"]) == sorted(f"{name}.{side}" for name in convs for side in "uv")


def test_a_resume_with_another_optimizer_is_refused(tmp_path):
    train.run(train.parse_args(run_argv(tmp_path, "adamw", "--max_iters", "1")))
    latest = str(tmp_path / "runs" / "adamw" / "latest.pt")
    argv = run_argv(tmp_path, "adamw", "--max_iters", "2", "--optimizer", "adamax", "--restore_path", latest)
    with pytest.raises(CheckpointError, match="trained with --optimizer adamw .* resume with --optimizer adamw"):
        train.run(train.parse_args(argv))
