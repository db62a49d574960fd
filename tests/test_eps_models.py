"""Time-conditioned eps-nets (unet_res, unet_ln) and the shared sinusoidal embedding."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dipddpm.errors import ConfigError
from dipddpm.models import build_backbone, check_size, size_requirement
from dipddpm.models import unet_ln, unet_res
from dipddpm.models.embeddings import batch_timesteps, sinusoidal_embedding

CONF = Path(__file__).resolve().parents[1] / "conf" / "eps_net"
SMALL = {"unet_res": {"channels": [8, 16, 16], "emb_dim": 32}, "unet_ln": {"channels": [4, 6, 8], "emb_dim": 16}}


def small_cfg(name, **extra):
    return OmegaConf.create({"name": name, **SMALL[name], **extra})


def test_sinusoidal_embedding_values():
    emb = sinusoidal_embedding(torch.tensor([0, 1, 7]), 4)
    assert emb.shape == (3, 4) and emb.dtype == torch.float32
    assert torch.allclose(emb[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # dim 4 -> frequencies 10000^0 = 1 and 10000^(-1/2) = 0.01
    expected = torch.tensor([math.sin(7.0), math.sin(0.07), math.cos(7.0), math.cos(0.07)])
    assert torch.allclose(emb[2], expected, atol=1e-6)
    with pytest.raises(ValueError):
        sinusoidal_embedding(torch.tensor([1]), 5)


def test_batch_timesteps_broadcasts_scalars():
    assert batch_timesteps(3, 4).tolist() == [3, 3, 3, 3]
    assert batch_timesteps(torch.tensor([1, 2]), 2).dtype == torch.long
    with pytest.raises(ValueError):
        batch_timesteps(torch.tensor([1, 2]), 3)


@pytest.mark.parametrize("name", ["unet_res", "unet_ln"])
def test_yaml_defaults_match_code(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg.name == name
    defaults = (unet_res if name == "unet_res" else unet_ln).DEFAULTS
    assert {k: cfg[k] for k in defaults} == defaults


@pytest.mark.parametrize("name", ["unet_res", "unet_ln"])
def test_default_nets_map_mnist_batches(name):
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.load(CONF / f"{name}.yaml"), 1, 1).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 10, 999]))
    assert out.shape == (3, 1, 28, 28) and torch.isfinite(out).all()
    assert size_requirement(OmegaConf.load(CONF / f"{name}.yaml")) == (4, 4)


@pytest.mark.parametrize("name", ["unet_res", "unet_ln"])
def test_output_depends_on_t(name):
    torch.manual_seed(0)
    net = build_backbone(small_cfg(name), 1, 2).eval()
    x = torch.randn(1, 1, 28, 28).expand(2, 1, 28, 28)
    with torch.no_grad():
        out = net(x, torch.tensor([3, 400]))
        scalar = net(x, torch.tensor(3))
    assert out.shape == (2, 2, 28, 28)
    assert not torch.allclose(out[0], out[1])
    assert torch.allclose(scalar[0], out[0], atol=1e-6)


def test_unet_res_other_sides_norms_and_no_attention():
    for norm in ["batch", "group", "none"]:
        net = build_backbone(small_cfg("unet_res", norm=norm, attention=False), 3, 3).eval()
        assert isinstance(net.attention, torch.nn.Identity)
        assert net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 3, 16, 16)
    net = build_backbone(small_cfg("unet_res"), 1, 1)
    assert isinstance(net.attention, unet_res.LinearAttention)
    net.train()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).mean().backward()
    assert net.t_in.weight.grad is not None and net.attention.to_qkv.weight.grad is not None


@pytest.mark.parametrize("side", [4, 8, 12, 32])
def test_unet_ln_builds_for_its_image_size(side):
    net = build_backbone(small_cfg("unet_ln", image_size=side), 1, 1)
    assert net(torch.randn(2, 1, side, side), torch.tensor([0, 5])).shape == (2, 1, side, side)


def test_unet_ln_layout_matches_report():
    net = build_backbone(OmegaConf.load(CONF / "unet_ln.yaml"), 1, 1)
    assert net.b1[0].norm.normalized_shape == (1, 28, 28)
    assert net.b3[0].conv1.out_channels == 40
    assert net.b_mid[0].norm.normalized_shape == (40, 3, 3)
    assert net.te4[0].out_features == 80 and net.te_out[0].out_features == 20
    assert isinstance(net.b_out[2].norm, torch.nn.Identity)


def test_unet_ln_rejects_other_input_side():
    net = build_backbone(small_cfg("unet_ln"), 1, 1)
    with pytest.raises(ConfigError, match="backbone.image_size"):
        net(torch.randn(1, 1, 32, 32), torch.tensor([0]))


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("unet_res", "channels", [8, 16]),
        ("unet_res", "emb_dim", 7),
        ("unet_res", "norm", "layer"),
        ("unet_res", "attention", "yes"),
        ("unet_res", "attention_heads", 0),
        ("unet_ln", "channels", [4, 0, 8]),
        ("unet_ln", "image_size", 30),
        ("unet_ln", "emb_dim", 0),
    ],
)
def test_bad_values_raise_config_error(name, key, value):
    cfg = small_cfg(name, **{key: value})
    with pytest.raises(ConfigError) as info:
        build_backbone(cfg, 1, 1)
    assert info.value.key == f"backbone.{key}"
    with pytest.raises(ConfigError):
        size_requirement(cfg)


def test_check_size_for_eps_nets():
    check_size(small_cfg("unet_res"), 28)
    with pytest.raises(ConfigError, match="data.size"):
        check_size(small_cfg("unet_ln"), 30)
