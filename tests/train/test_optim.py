"""Optimizer parameter groups, the 8-bit optimizer on CPU, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attanchor.train.optim import build_optimizer, build_scheduler, param_groups


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(3))  # a 1-D gain, not named "norm"


def _ids(group) -> set[int]:
    return {id(p) for p in group["params"]}


def test_param_groups_split_decay_from_no_decay():
    m = Tiny()
    groups = param_groups(m.named_parameters(), weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert _ids(groups[0]) == {id(m.proj.weight)}
    assert _ids(groups[1]) == {id(m.proj.bias), id(m.norm.weight), id(m.norm.bias), id(m.scale)}
    # a module and bare parameters give the same split (bare: by ndim)
    assert [_ids(g) for g in param_groups(m, 0.1)] == [_ids(g) for g in groups]
    assert [_ids(g) for g in param_groups(m.parameters(), 0.1)] == [_ids(g) for g in groups]


def test_param_groups_by_name_catch_2d_norm_weights():
    norm_2d = nn.Parameter(torch.ones(2, 3))
    groups = param_groups([("model.rmsnorm.weight", norm_2d)], weight_decay=0.1)
    assert groups == [{"params": [norm_2d], "weight_decay": 0.0}]


def test_param_groups_need_something_to_train():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(frozen, 0.0)
    with pytest.raises(TypeError, match="pairs"):
        param_groups([1.0], 0.0)


def test_adamw():
    m = Tiny()
    opt = build_optimizer(m.named_parameters(), "adamw", lr=2e-4, weight_decay=0.01,
                          betas=(0.8, 0.95), eps=1e-6)
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert {g["lr"] for g in opt.param_groups} == {2e-4}
    assert {g["betas"] for g in opt.param_groups} == {(0.8, 0.95)}
    assert {g["eps"] for g in opt.param_groups} == {1e-6}


def test_bias_is_not_decayed():
    # lr * wd * w shrinks only the matrix; with zero gradients Adam's update is 0
    m = nn.Linear(2, 2)
    w0, b0 = m.weight.detach().clone(), m.bias.detach().clone()
    opt = build_optimizer(m.named_parameters(), lr=0.1, weight_decay=0.5)
    m.weight.grad = torch.zeros_like(m.weight)
    m.bias.grad = torch.zeros_like(m.bias)
    opt.step()
    torch.testing.assert_close(m.weight.detach(), w0 * (1 - 0.1 * 0.5))
    torch.testing.assert_close(m.bias.detach(), b0)


def test_paged_adamw_8bit_runs_on_cpu():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 1))
    opt = build_optimizer(model.named_parameters(), "paged_adamw_8bit", lr=1e-2,
                          weight_decay=0.01)
    assert isinstance(opt, bnb.optim.PagedAdamW8bit)
    x = torch.randn(256, 64)
    y = x[:, :1] * 2.0
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # matrices of >= 4096 elements keep 8-bit moments; the bias keeps 32-bit ones
    state = opt.state[model[0].weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert opt.state[model[0].bias]["state1"].dtype == torch.float32


def test_build_optimizer_rejects():
    m = Tiny()
    with pytest.raises(ValueError, match="allowed are"):
        build_optimizer(m.named_parameters(), "sgd")
    with pytest.raises(ValueError, match="lr=0"):
        build_optimizer(m.named_parameters(), lr=0)
    with pytest.raises(ValueError, match="weight_decay=-1"):
        build_optimizer(m.named_parameters(), weight_decay=-1)


def _factors(config: dict, steps: int) -> list[float]:
    scheduler = config["scheduler"]
    optimizer = scheduler.optimizer
    base = optimizer.param_groups[0]["initial_lr"]
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"] / base)
        optimizer.step()
        scheduler.step()
    return out


def _sgd():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)


def test_cosine_with_warmup_by_hand():
    config = build_scheduler(_sgd(), total_steps=10, warmup_ratio=0.2)
    assert config["interval"] == "step" and config["frequency"] == 1
    # warmup ceil(10 * 0.2) = 2 steps: 0, 1/2; then 0.5 * (1 + cos(pi * k / 8)) for k = 0..7
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert _factors(config, 10) == pytest.approx(expected, abs=1e-12)
    assert expected[2:5] == pytest.approx([1.0, 0.9619397, 0.8535534], abs=1e-7)


def test_warmup_rounds_up_and_constant_schedule():
    # ceil(7 * 0.1) = 1 warmup step
    assert _factors(build_scheduler(_sgd(), 7, 0.1, "constant"), 4) == [0.0, 1.0, 1.0, 1.0]
    assert _factors(build_scheduler(_sgd(), 4, 0.0, "constant"), 3) == [1.0, 1.0, 1.0]
    assert _factors(build_scheduler(_sgd(), 4, 0.0), 4) == pytest.approx(
        [1.0, 0.8535534, 0.5, 0.1464466], abs=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0}, "total_steps=0"),
        ({"total_steps": 2.5}, "total_steps=2.5"),
        ({"total_steps": 10, "warmup_ratio": 1.0}, "warmup_ratio=1.0"),
        ({"total_steps": 10, "schedule": "linear"}, "schedule='linear'"),
    ],
)
def test_build_scheduler_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_scheduler(_sgd(), **kwargs)
