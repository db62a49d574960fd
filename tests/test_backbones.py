"""Image-to-image DIP backbones: shapes, parameter counts, ranges, size rules, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dipddpm.errors import ConfigError
from dipddpm.models import build_backbone, check_size, size_requirement
from dipddpm.profile import preset_merged

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"

VGG16 = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


def load(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def conv_count(k: int, c_in: int, c_out: int, bias: bool = True) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def bn_count(c: int) -> int:
    return 2 * c


def cnn_expected(widths: list[int]) -> int:
    return sum(conv_count(3, a, b) for a, b in zip(widths[:-1], widths[1:]))


def unet_expected(c_in, c_out, channels, skips, k=5, ks=5, ku=4) -> int:
    total, previous = 0, c_in
    for c in channels:
        total += conv_count(k, previous, c) + bn_count(c)
        previous = c
    for c, s in zip(channels[:-1], skips):
        if s:
            total += conv_count(ks, c, s)
    previous = channels[-1]
    for c, s in reversed(list(zip(channels[:-1], skips))):
        total += conv_count(ku, previous, c) + bn_count(c + s)
        previous = c + s
    return total + conv_count(ku, previous, c_out)


def segnet_expected(c_in, c_out, blocks) -> int:
    pairs, previous = [], c_in
    for block in blocks:
        for width in block:
            pairs.append((previous, width))
            previous = width
    encoder = sum(conv_count(3, a, b) + bn_count(b) for a, b in pairs)
    decoder = sum(conv_count(3, b, a) + bn_count(a) for a, b in pairs[1:])
    first_out = pairs[0][1]
    return encoder + decoder + conv_count(3, first_out, c_out)


def skip_expected(c_in, c_out, down, up, skip, kd=3, ku=3, ks=1, bias=True, one_by_one=True) -> int:
    total, depth = 0, c_in
    levels = len(down)
    for i in range(levels):
        total += conv_count(kd, depth, down[i], bias) + bn_count(down[i])
        total += conv_count(kd, down[i], down[i], bias) + bn_count(down[i])
        if skip[i]:
            total += conv_count(ks, depth, skip[i], bias) + bn_count(skip[i])
        merged = skip[i] + (up[i + 1] if i < levels - 1 else down[i])
        total += bn_count(merged) + conv_count(ku, merged, up[i], bias) + bn_count(up[i])
        if one_by_one:
            total += conv_count(1, up[i], up[i], bias) + bn_count(up[i])
        depth = down[i]
    return total + conv_count(1, up[0], c_out, bias)


SMALL_SKIP = dict(num_channels_down=[8, 8, 16], num_channels_up=[8, 8, 16], num_channels_skip=[4, 0, 4])


@pytest.mark.parametrize(
    "name, overrides, channels, side",
    [
        ("cnn", {}, 3, 12),
        ("cnn_r3", {}, 1, 28),
        ("unet", {}, 3, 128),
        ("segnet", {}, 3, 64),
        ("skip", SMALL_SKIP, 32, 32),
        ("skip_mnist", {}, 1, 32),
    ],
)
def test_every_preset_builds_and_keeps_shape(name, overrides, channels, side):
    cfg = load(name, **overrides)
    assert "in_channels" not in cfg and "out_channels" not in cfg
    out_channels = 1 if channels == 1 else 3
    net = build_backbone(cfg, channels, out_channels)
    with torch.no_grad():
        y = net(torch.rand(1, channels, side, side))
    assert y.shape == (1, out_channels, side, side)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    "depth, hidden", [(3, [64, 64]), (4, [64, 128, 64]), (5, [64, 128, 256, 128])]
)
def test_cnn_depth_presets_have_report_widths(depth, hidden):
    net = build_backbone(load("cnn", depth=depth), 3, 3)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == list(zip([3] + hidden, hidden + [3]))
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.ReLU) for m in net) == depth - 1
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Sigmoid)) for m in net)
    assert n_params(net) == cnn_expected([3] + hidden + [3])


def test_cnn_r3_matches_report_layer_order():
    net = build_backbone(load("cnn_r3"), 1, 1)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Conv2d", "ReLU"] * 4
    assert [(m.in_channels, m.out_channels) for m in net if isinstance(m, nn.Conv2d)] == [
        (1, 64), (64, 64), (64, 1), (1, 1)
    ]
    assert n_params(net) == 640 + 36928 + 577 + 10


def test_cnn_out_activation_sigmoid_bounds_output():
    net = build_backbone(load("cnn", depth=3, out_activation="sigmoid"), 1, 1)
    y = net(torch.randn(1, 1, 5, 5) * 100)
    assert y.min() >= 0 and y.max() <= 1


def test_unet_parameter_count_range_and_layout():
    cfg = load("unet", merge_width="level_plus_skip", out_norm="none")  # R2's own layout: test_fidelity.py
    net = build_backbone(cfg, 3, 3)
    assert n_params(net) == unet_expected(3, 3, [8, 16, 32, 64, 128, 256], [0, 0, 4, 4, 4])
    net.train()
    y = net(torch.randn(1, 3, 128, 128) * 5)
    assert y.min() >= 0 and y.max() <= 1
    skip_convs = [m for m in net.skip if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in skip_convs] == [
        (32, 4, (5, 5)), (64, 4, (5, 5)), (128, 4, (5, 5))
    ]
    assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01
               for m in net.modules() if isinstance(m, nn.LeakyReLU))


def test_unet_configurable_channels_and_minimum_side():
    cfg = load("unet", channels=[4, 4, 8], skip_channels=[2, 0], merge_width="level_plus_skip", out_norm="none")
    net = build_backbone(cfg, 1, 2)
    assert n_params(net) == unet_expected(1, 2, [4, 4, 8], [2, 0])
    assert size_requirement(cfg) == (8, 16)
    net.train()
    assert net(torch.rand(1, 1, 16, 16)).shape == (1, 2, 16, 16)
    with pytest.raises(ValueError):
        net(torch.rand(1, 1, 8, 8))


def test_segnet_parameter_count_and_linear_output():
    net = build_backbone(load("segnet"), 3, 3)
    assert n_params(net) == segnet_expected(3, 3, VGG16)
    assert isinstance(net.decoder[-1][-1], nn.Conv2d)
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(p.return_indices for p in pools)


def test_segnet_unpool_puts_maxima_back_in_place():
    cfg = load("segnet", blocks=[[1]])
    net = build_backbone(cfg, 1, 1).eval()
    assert n_params(net) == segnet_expected(1, 1, [[1]])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.weight[:, :, 1, 1] = 1.0
                m.bias.zero_()
        x = torch.rand(1, 1, 4, 4) + 0.1
        y = net(x)
    expected = torch.zeros(4, 4)
    for r in range(0, 4, 2):
        for c in range(0, 4, 2):
            cell = x[0, 0, r:r + 2, c:c + 2]
            position = int(cell.argmax())
            expected[r + position // 2, c + position % 2] = cell.max()
    scale = 1 / (1 + 1e-5) ** 0.5  # eval-mode BatchNorm with fresh running stats
    assert torch.allclose(y[0, 0], expected * scale, atol=1e-6)


def test_skip_hand_counted_tiny_network():
    cfg = load("skip", num_channels_down=[2], num_channels_up=[2], num_channels_skip=[1])
    net = build_backbone(cfg, 1, 1)
    # conv3x3 1->2 (20) BN (4) conv3x3 2->2 (38) BN (4) | skip conv1x1 1->1 (2) BN (2)
    # BN(3) (6) conv3x3 3->2 (56) BN (4) conv1x1 2->2 (6) BN (4) | out conv1x1 2->1 (3)
    assert n_params(net) == 149


@pytest.mark.parametrize(
    "name, overrides, c_in, c_out",
    [
        ("skip", {}, 32, 3),
        ("skip_mnist", {}, 1, 1),
        ("skip", dict(SMALL_SKIP, need_bias=False, need1x1_up=False), 3, 3),
    ],
)
def test_skip_parameter_counts(name, overrides, c_in, c_out):
    cfg = load(name, **overrides)
    net = build_backbone(cfg, c_in, c_out)
    expected = skip_expected(
        c_in, c_out, list(cfg.num_channels_down), list(cfg.num_channels_up), list(cfg.num_channels_skip),
        bias=cfg.need_bias, one_by_one=cfg.need1x1_up,
    )
    assert n_params(net) == expected


def test_skip_layer_order_and_options():
    net = build_backbone(load("skip_mnist"), 1, 1)
    modules = list(net.modules())
    assert sum(isinstance(m, nn.Upsample) and m.mode == "bilinear" for m in modules) == 3
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    assert all(m.padding_mode == "reflect" for m in convs if m.kernel_size == (3, 3))
    assert sum(m.stride == (2, 2) for m in convs) == 3
    assert all(m.negative_slope == 0.2 for m in modules if isinstance(m, nn.LeakyReLU))
    assert isinstance(net[-1], nn.Sigmoid)
    level0 = net[0]
    assert isinstance(level0[0], nn.Sequential)  # skip channels 0 at level 0: no concat
    assert type(level0[0][6][0]).__name__ == "Concat"
    assert [type(m).__name__ for m in level0[1:]] == [
        "BatchNorm2d", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU"
    ]


def test_skip_output_in_unit_range_and_minimum_side():
    cfg = load("skip_mnist")
    net = build_backbone(cfg, 1, 1).train()
    y = net(torch.randn(1, 1, 16, 16) * 10)
    assert y.shape == (1, 1, 16, 16) and y.min() >= 0 and y.max() <= 1
    with pytest.raises((ValueError, RuntimeError)):
        net(torch.randn(1, 1, 8, 8))


def test_size_requirements():
    assert size_requirement(load("cnn")) == (1, 1)
    assert size_requirement(load("cnn_r3")) == (1, 1)
    assert size_requirement(load("unet")) == (64, 128)
    assert size_requirement(load("segnet")) == (32, 32)
    assert size_requirement(load("skip")) == (32, 64)
    assert size_requirement(load("skip_mnist")) == (8, 16)
    assert size_requirement(load("skip_mnist", pad="zero", filter_size_down=5)) == (8, 16)
    assert size_requirement(load("skip_mnist", filter_size_down=5)) == (8, 24)
    check_size(load("skip_mnist"), 32)
    with pytest.raises(ConfigError, match="data.size"):
        check_size(load("unet"), 96)


def backbone_for_profile(cfg, profile):
    """The backbone group as apply_profile leaves it under ``profile``."""
    return OmegaConf.create(preset_merged(OmegaConf.to_container(cfg), "backbone", profile))


def test_smoke_presets_narrow_the_r2_nets_and_leave_other_profiles_alone():
    for name, faithful_rule, smoke_rule in (("unet", (64, 128), (8, 16)), ("segnet", (32, 32), (8, 8))):
        cfg = load(name)
        for profile in ("faithful", "standard", "quick", None):
            kept = backbone_for_profile(cfg, profile)
            assert "at_profile" not in kept and size_requirement(kept) == faithful_rule
        smoke = backbone_for_profile(cfg, "smoke")
        assert "at_profile" not in smoke and size_requirement(smoke) == smoke_rule
        net = build_backbone(smoke, 3, 3)
        assert net(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert backbone_for_profile(load("segnet"), "smoke").blocks == [[8], [8], [16]]
    assert backbone_for_profile(load("unet"), "smoke").channels == [8, 16, 16]
    with pytest.raises(ConfigError, match="backbone.at_profile.smoke"):
        backbone_for_profile(load("segnet", at_profile={"smoke": {"width": 3}}), "smoke")


@pytest.mark.parametrize(
    "name, overrides, key",
    [
        ("cnn", {"depth": 7}, "backbone.depth"),
        ("cnn", {"hidden": [8, 8]}, "backbone.depth"),
        ("cnn", {"out_activation": "tanh"}, "backbone.out_activation"),
        ("cnn", {"depth": None, "hidden": [8, -1]}, "backbone.hidden"),
        ("unet", {"skip_channels": [4, 4]}, "backbone.skip_channels"),
        ("unet", {"up_kernel_size": 3}, "backbone.up_kernel_size"),
        ("segnet", {"blocks": [[64], []]}, "backbone.blocks[1]"),
        ("skip", {"num_channels_up": [8, 8]}, "backbone.num_channels_up"),
        ("skip", {"num_channels_skip": [4, 4, 4]}, "backbone.num_channels_skip"),
        ("skip", {"upsample_mode": "bicubic"}, "backbone.upsample_mode"),
        ("skip", {"pad": "circular"}, "backbone.pad"),
        ("skip", {"filter_size_up": 4}, "backbone.filter_size_up"),
    ],
)
def test_bad_values_raise_config_error_naming_key(name, overrides, key):
    cfg = load(name, **overrides)
    with pytest.raises(ConfigError) as caught:
        build_backbone(cfg, 3, 3)
    assert caught.value.key == key
    assert key in str(caught.value)


def test_depth_seven_message():
    with pytest.raises(ConfigError, match=r"backbone\.depth=7.*one of 3, 4, 5"):
        size_requirement(load("cnn", depth=7))
