"""Diffusion core: samplers against hand-computed updates, training loop, checkpoint cache."""

import math

import pytest
import torch
from torch import nn

from dipddpm.diffusion import (
    Sampler,
    chain_timesteps,
    checkpoint_key,
    load_or_train_with_info,
    load_sample_grids,
    sample,
    save_sample_grids,
    train_eps,
)
from dipddpm.diffusion.schedule import linear_schedule
from dipddpm.errors import ConfigError, DivergedError

# betas 0.1, 0.2, 0.3 -> alphas 0.9, 0.8, 0.7 -> abar 0.9, 0.72, 0.504
BETAS = [0.1, 0.2, 0.3]
ALPHAS = [0.9, 0.8, 0.7]
ABAR = [0.9, 0.72, 0.504]


def three_step():
    return linear_schedule(3, 0.1, 0.3)


class ConstantEps(nn.Module):
    """eps = c everywhere; records the timesteps it was called with."""

    def __init__(self, c=0.3):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t):
        self.calls.append(t.clone())
        return torch.full_like(x, self.c) + 0 * self.weight


class LinearEps(nn.Module):
    """eps = 0.1 (t + 1) x: depends on both input and timestep."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return 0.1 * (t.double() + 1).reshape(-1, 1, 1, 1).to(x.dtype) * x


class PerStepAffine(nn.Module):
    """eps = a[t] * x + b[t] with a per-t scalar and per-t image: can fit a single image exactly."""

    def __init__(self, steps, shape):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(steps))
        self.b = nn.Parameter(torch.zeros(steps, *shape))

    def forward(self, x, t):
        return self.a[t].reshape(-1, 1, 1, 1) * x + self.b[t]


class Recorder(nn.Module):
    """Records (x_t, t) and returns a learnable constant."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t):
        self.seen.append((x.detach().clone(), t.clone()))
        return torch.zeros_like(x) + self.bias


def test_q_sample_matches_hand_values():
    schedule = three_step()
    x0 = torch.full((1, 1, 2, 2), 1.0)
    noise = torch.full((1, 1, 2, 2), 0.5)
    x1 = schedule.q_sample(x0, torch.tensor([1]), noise)
    expected = math.sqrt(0.72) * 1.0 + math.sqrt(1 - 0.72) * 0.5
    assert torch.allclose(x1, torch.full_like(x1, expected), atol=1e-6)


def test_one_ancestral_step_at_t0_has_no_noise():
    model = ConstantEps(0.3)
    x = torch.full((2, 1, 2, 2), 0.7)
    out = sample(model, three_step(), x, t_start=0)
    expected = (0.7 - BETAS[0] / math.sqrt(1 - ABAR[0]) * 0.3) / math.sqrt(ALPHAS[0])
    assert torch.allclose(out.samples, torch.full_like(x, expected), atol=1e-6)
    assert out.model_calls == 1


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_two_ancestral_steps_with_fixed_noise(variance):
    model = ConstantEps(0.3)
    z = 0.4
    noise_calls = []

    def noise_fn(shape):
        noise_calls.append(shape)
        return torch.full(shape, z)

    x = torch.full((1, 1, 3, 3), -0.2)
    out = sample(model, three_step(), x, t_start=1, variance=variance, noise_fn=noise_fn)
    var1 = BETAS[1] if variance == "beta" else BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])
    x_after_1 = (-0.2 - BETAS[1] / math.sqrt(1 - ABAR[1]) * 0.3) / math.sqrt(ALPHAS[1]) + math.sqrt(var1) * z
    x_after_0 = (x_after_1 - BETAS[0] / math.sqrt(1 - ABAR[0]) * 0.3) / math.sqrt(ALPHAS[0])
    assert torch.allclose(out.samples, torch.full_like(x, x_after_0), atol=1e-5)
    assert noise_calls == [(1, 1, 3, 3)]  # noise is added only for t > 0


def test_ancestral_runs_t_start_plus_one_model_calls():
    schedule = linear_schedule(10, 1e-4, 0.02)
    model = ConstantEps(0.0)
    result = sample(model, schedule, (3, 1, 4, 4), t_start=4, generator=torch.Generator().manual_seed(0))
    assert result.model_calls == 5 and len(model.calls) == 5
    assert [int(t[0]) for t in model.calls] == [4, 3, 2, 1, 0]
    assert all(t.shape == (3,) and t.dtype == torch.long for t in model.calls)
    assert result.samples.shape == (3, 1, 4, 4) and result.seconds >= 0
    model.calls.clear()
    sample(model, schedule, (1, 1, 4, 4))
    assert len(model.calls) == 10


def test_ancestral_is_reproducible_and_uses_noise_fn_for_start():
    schedule = linear_schedule(5, 1e-3, 0.05)
    model = ConstantEps(0.1)
    a = sample(model, schedule, (2, 1, 3, 3), generator=torch.Generator().manual_seed(3)).samples
    b = sample(model, schedule, (2, 1, 3, 3), generator=torch.Generator().manual_seed(3)).samples
    assert torch.equal(a, b)
    seen = []
    sample(model, schedule, (2, 1, 3, 3), t_start=0, noise_fn=lambda s: seen.append(s) or torch.zeros(s))
    assert seen == [(2, 1, 3, 3)]


def test_callback_gets_x0_prediction_and_clip():
    model = ConstantEps(0.3)
    seen = []
    x = torch.full((1, 1, 2, 2), 0.7)
    sample(model, three_step(), x, t_start=2, variance="beta", noise_fn=torch.zeros,
                     callback=lambda t, xt, x0: seen.append((t, xt.clone(), x0.clone())))
    assert [s[0] for s in seen] == [2, 1, 0]
    t, xt, x0 = seen[0]
    assert torch.allclose(x0, (xt - math.sqrt(1 - ABAR[2]) * 0.3) / math.sqrt(ABAR[2]))
    clipped = sample(model, three_step(), torch.full((1, 1, 2, 2), 5.0), t_start=0, clip_x0=True).samples
    # at t = 0 the posterior mean given a clipped x0 is x0 itself (abar_prev = 1)
    assert torch.allclose(clipped, torch.ones_like(clipped))


def test_predict_x0_inverts_q_sample():
    schedule = linear_schedule(20, 1e-4, 0.2)
    x0 = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 5, 11, 19])
    xt = schedule.q_sample(x0, t, eps)
    assert torch.allclose(schedule.predict_x0(xt, t, eps), x0, atol=1e-5)
    assert torch.allclose(schedule.predict_x0(xt[:1], 0, eps[:1]), x0[:1], atol=1e-5)


def test_ddim_eta0_all_steps_matches_hand_update():
    model = LinearEps()
    x = torch.full((2, 1, 2, 2), 0.6, dtype=torch.float64)
    out = sample(model, three_step(), x.float(), sampler="ddim", calls=3, eta=0.0)
    value = 0.6
    for t, a_prev in [(2, ABAR[1]), (1, ABAR[0]), (0, 1.0)]:
        eps = 0.1 * (t + 1) * value
        x0 = (value - math.sqrt(1 - ABAR[t]) * eps) / math.sqrt(ABAR[t])
        value = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    assert torch.allclose(out.samples.double(), torch.full_like(x, value), atol=1e-5)
    assert out.model_calls == 3
    again = sample(model, three_step(), x.float(), sampler="ddim", calls=3, eta=0.0)
    assert torch.equal(out.samples, again.samples)


def test_ddim_skipping_steps_matches_hand_update():
    schedule = linear_schedule(10, 1e-2, 0.2)
    abar = schedule.alphas_cumprod.tolist()
    out = sample(LinearEps(), schedule, torch.full((1, 1, 2, 2), 0.6), sampler="ddim", calls=4)
    value, visited = 0.6, [9, 6, 3, 0]
    for t, s in zip(visited, visited[1:] + [None]):
        a_s = abar[s] if s is not None else 1.0
        eps = 0.1 * (t + 1) * value
        x0 = (value - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])
        value = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
    assert torch.allclose(out.samples.double(), torch.full((1, 1, 2, 2), value, dtype=torch.float64), atol=1e-5)


def test_ddim_step_count_and_spacing():
    schedule = linear_schedule(10, 1e-4, 0.02)
    assert chain_timesteps(9, 4) == [9, 6, 3, 0]
    assert chain_timesteps(9, 10) == list(range(9, -1, -1))
    assert chain_timesteps(5, 1) == [5]
    model = ConstantEps(0.0)
    result = sample(model, schedule, (2, 1, 3, 3), sampler="ddim", calls=4, eta=1.0,
                    generator=torch.Generator().manual_seed(0))
    assert [int(t[0]) for t in model.calls] == [9, 6, 3, 0]
    assert result.samples.shape == (2, 1, 3, 3) and torch.isfinite(result.samples).all()
    with pytest.raises(ConfigError, match="calls"):
        sample(model, schedule, (1, 1, 2, 2), sampler="ddim", calls=11)


def test_sampler_rejects_bad_values():
    model = ConstantEps()
    with pytest.raises(ConfigError, match="t_start"):
        sample(model, three_step(), (1, 1, 2, 2), t_start=3)
    with pytest.raises(ConfigError, match="variance"):
        sample(model, three_step(), (1, 1, 2, 2), variance="fixed")


def test_sampling_restores_training_mode():
    model = ConstantEps()
    model.train()
    sample(model, three_step(), (1, 1, 2, 2))
    assert model.training


def test_training_single_constant_image_reduces_loss():
    schedule = linear_schedule(5, 0.05, 0.3)
    image = torch.full((1, 1, 4, 4), 0.8)
    model = PerStepAffine(5, (1, 4, 4))
    result = train_eps(model, schedule, image, iterations=300, batch_size=1, lr=0.05, seed=0)
    assert len(result.losses) == 300 and all(math.isfinite(v) for v in result.losses)
    first, last = sum(result.losses[:50]) / 50, sum(result.losses[-50:]) / 50
    assert last < 0.5 * first
    assert result.ema_model is None and result.seconds > 0 and result.model is model


def test_training_hooks_and_t_max_are_used():
    schedule = linear_schedule(10, 0.01, 0.2)
    data = torch.arange(3, dtype=torch.float32).reshape(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    noise_inputs, target_inputs = [], []

    def forward_noise(x0):
        noise_inputs.append(x0.clone())
        return torch.full_like(x0, 0.25)

    def loss_target(noise, x0):
        target_inputs.append((noise.clone(), x0.clone()))
        return x0

    model = Recorder()
    train_eps(model, schedule, data, iterations=7, batch_size=2, lr=1e-3, t_max=4,
              forward_noise=forward_noise, loss_target=loss_target, seed=1)
    assert len(noise_inputs) == len(target_inputs) == len(model.seen) == 7
    abar = schedule.alphas_cumprod
    for x0, (noise, x0_t), (xt, t) in zip(noise_inputs, target_inputs, model.seen):
        assert torch.equal(x0, x0_t) and torch.all(noise == 0.25)
        assert int(t.max()) < 4
        a = abar[t].float().reshape(-1, 1, 1, 1)
        assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * 0.25, atol=1e-6)


def test_epochs_visit_every_image_once():
    schedule = linear_schedule(4, 0.01, 0.2)
    data = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    seen = []

    def forward_noise(x0):
        seen.append(x0[:, 0, 0, 0].tolist())
        return torch.zeros_like(x0)

    result = train_eps(Recorder(), schedule, data, epochs=3, batch_size=2, lr=1e-3, forward_noise=forward_noise)
    assert len(result.losses) == 9 and [len(b) for b in seen] == [2, 2, 1] * 3
    for epoch in range(3):
        values = sorted(v for batch in seen[3 * epoch : 3 * epoch + 3] for v in batch)
        assert values == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_flip_mirrors_some_samples():
    schedule = linear_schedule(4, 0.01, 0.2)
    image = torch.tensor([[[[1.0, 0.0]]]])
    seen = []

    def forward_noise(x0):
        seen.append(x0[0, 0, 0, 0].item())
        return torch.zeros_like(x0)

    train_eps(Recorder(), schedule, image, iterations=40, batch_size=1, lr=1e-3, flip=True, forward_noise=forward_noise)
    assert set(seen) == {0.0, 1.0}


def test_ema_cosine_and_grad_clip_run():
    schedule = linear_schedule(5, 0.05, 0.3)
    image = torch.full((1, 1, 4, 4), 0.5)
    result = train_eps(PerStepAffine(5, (1, 4, 4)), schedule, image, iterations=20, batch_size=1, lr=0.05,
                       ema_decay=0.9, lr_schedule="cosine", grad_clip=1.0)
    assert result.ema_model is not None and result.ema_model is not result.model
    assert not torch.allclose(result.ema_model.b, result.model.b)
    assert all(not p.requires_grad for p in result.ema_model.parameters())
    zero = train_eps(PerStepAffine(5, (1, 4, 4)), schedule, image, iterations=3, batch_size=1, lr=0.05, ema_decay=0.0)
    assert torch.equal(zero.ema_model.b, zero.model.b)


def test_nan_model_raises_diverged():
    class NanModel(Recorder):
        def forward(self, x, t):
            return x * float("nan") + self.bias

    with pytest.raises(DivergedError) as info:
        train_eps(NanModel(), three_step(), torch.zeros(1, 1, 2, 2), iterations=5, batch_size=1, lr=1e-3)
    assert info.value.step == 0


def test_train_eps_rejects_bad_values():
    args = dict(batch_size=1, lr=1e-3)
    data = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ConfigError, match="lr_schedule"):
        train_eps(Recorder(), three_step(), data, iterations=1, lr_schedule="step", **args)
    with pytest.raises(ConfigError, match="t_max"):
        train_eps(Recorder(), three_step(), data, iterations=1, t_max=4, **args)
    with pytest.raises(ConfigError, match="iterations"):
        train_eps(Recorder(), three_step(), data, iterations=1, epochs=1, **args)
    with pytest.raises(ConfigError, match="method.train.batch_size"):
        train_eps(Recorder(), three_step(), data, iterations=1, batch_size=0, lr=1e-3, key_prefix="method.train.")


def test_checkpoint_key_is_canonical():
    a = checkpoint_key({"lr": 1e-3, "steps": 10, "nested": {"x": [1, 2]}})
    b = checkpoint_key({"nested": {"x": [1, 2]}, "steps": 10, "lr": 1e-3})
    c = checkpoint_key({"lr": 1e-3, "steps": 11, "nested": {"x": [1, 2]}})
    assert a == b != c and len(a) == 64
    from omegaconf import OmegaConf

    assert checkpoint_key(OmegaConf.create({"steps": 10, "lr": 1e-3, "nested": {"x": [1, 2]}})) == a


def test_load_or_train_reuses_cache(tmp_path):
    config = {"what": "tiny", "steps": 3}
    calls = []

    def build():
        torch.manual_seed(0)
        return nn.Linear(2, 2)

    def train(model):
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(0.5)
        return model

    model, trained, _ = load_or_train_with_info(tmp_path, config, build, lambda m: (train(m), {}))
    assert trained and calls == [1]
    key = checkpoint_key(config)
    assert (tmp_path / f"{key}.pt").is_file() and (tmp_path / f"{key}.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again, trained_again, _ = load_or_train_with_info(tmp_path, config, build, lambda m: (train(m), {}))
    assert not trained_again and calls == [1]
    assert torch.all(again.weight == 0.5)
    _, trained_other, _ = load_or_train_with_info(tmp_path, {"what": "tiny", "steps": 4}, build,
                                                  lambda m: (train(m), {}))
    assert trained_other and calls == [1, 1]


def test_load_or_train_with_info_round_trip_and_corrupt_file(tmp_path):
    config = {"k": 1}
    model, trained, info = load_or_train_with_info(tmp_path, config, lambda: nn.Linear(1, 1),
                                                   lambda m: (m, {"loss_final": 0.25}))
    assert trained and info == {"loss_final": 0.25}
    _, trained, info = load_or_train_with_info(tmp_path, config, lambda: nn.Linear(1, 1), pytest.fail)
    assert not trained and info == {"loss_final": 0.25}
    (tmp_path / f"{checkpoint_key(config)}.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="training again"):
        _, trained, _ = load_or_train_with_info(tmp_path, config, lambda: nn.Linear(1, 1), lambda m: (m, {}))
    assert trained


def test_a_cached_network_gets_the_same_weights_whatever_the_jobs_thread_count(tmp_path):
    """The digit classifier (1000 digits, 1 epoch) trained under 1 and under 2 torch threads: without
    the cache's fixed training thread count the two differ in their float reductions."""
    from dipddpm.digit_metrics import get_digit_classifier

    def weights(threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        model = get_digit_classifier(tmp_path / f"threads{threads}", limit=1000, epochs=1)
        assert torch.get_num_threads() == threads      # the job's own count is back afterwards
        return [p.detach().clone() for p in model.parameters()]

    before = torch.get_num_threads()
    try:
        one, two = weights(1), weights(2)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_ancestral_sampler_on_a_respaced_chain_matches_hand_update():
    """Two calls over the three-step schedule visit t = 2, 0; the chain's betas are
    1 - abar_2 / abar_0 and 1 - abar_0 (abar kept at the visited steps)."""
    model = ConstantEps(0.3)
    seen_t = []
    model.forward = lambda x, t, f=model.forward: seen_t.append(int(t[0])) or f(x, t)
    z = 0.4
    out = sample(model, three_step(), torch.full((1, 1, 2, 2), -0.2), calls=2, noise_fn=lambda s: torch.full(s, z))
    assert seen_t == [2, 0] and out.model_calls == 2
    abar = [ABAR[0], ABAR[2]]
    beta = [1 - abar[0], 1 - abar[1] / abar[0]]
    x1 = (-0.2 - beta[1] / math.sqrt(1 - abar[1]) * 0.3) / math.sqrt(1 - beta[1]) + math.sqrt(beta[1]) * z
    x0 = (x1 - beta[0] / math.sqrt(1 - abar[0]) * 0.3) / math.sqrt(1 - beta[0])
    assert torch.allclose(out.samples, torch.full((1, 1, 2, 2), x0), atol=1e-5)
    chain = Sampler(three_step(), "ancestral")
    assert chain.set_timesteps(calls=3) == [2, 1, 0] and chain.chain is chain.schedule


def test_callback_gets_the_x0_before_clipping_and_ddim_takes_noise_fn():
    """One x0 formula (NoiseSchedule.predict_x0): the callback sees it unclipped, the chain uses it clipped."""
    model = ConstantEps(0.0)
    seen = []
    x = torch.full((1, 1, 2, 2), 5.0)
    out = sample(model, three_step(), x, t_start=0, clip_x0=True, callback=lambda t, xt, x0: seen.append(x0))
    assert torch.allclose(seen[0], x / math.sqrt(ABAR[0])) and torch.allclose(out.samples, torch.ones_like(x))
    draws = []
    sample(model, three_step(), (1, 1, 2, 2), sampler="ddim", calls=3, eta=1.0,
           noise_fn=lambda s: draws.append(s) or torch.zeros(s))
    assert len(draws) == 3  # x_T and the two steps with sigma > 0 (none at the last, t = 0)


def test_sample_grids_round_trip_beside_a_checkpoint(tmp_path):
    grids = {5: torch.linspace(0, 1, 12).reshape(2, 2, 3).numpy()}
    save_sample_grids(tmp_path / "g.npz", grids, {"samples": 4})
    loaded = load_sample_grids(tmp_path / "g.npz", {"samples": 4})
    assert list(loaded) == [5] and abs(loaded[5] - grids[5]).max() <= 0.5 / 255 + 1e-7
    assert load_sample_grids(tmp_path / "g.npz", {"samples": 8}) == {}
    assert load_sample_grids(tmp_path / "missing.npz", {"samples": 4}) == {}


def test_device_helpers_and_the_dip_code_are_written_once():
    """CUDA synchronise, the model-device lookup and make_code live in one place each."""
    from pathlib import Path

    from dipddpm.dip import make_code
    from dipddpm.runtime import model_device

    package = Path(__file__).resolve().parents[1] / "dipddpm"
    sources = {p: p.read_text() for p in package.rglob("*.py")}
    assert [p.name for p, text in sources.items() if "torch.cuda.synchronize(" in text] == ["runtime.py"]
    assert [p.name for p, text in sources.items() if "def make_code(" in text] == ["dip.py"]
    assert not [p.name for p, text in sources.items() if "def _model_device" in text or "def _device_of" in text
                or "def _resolve_device" in text]
    holder = nn.Module()
    holder.register_buffer("b", torch.zeros(1))
    assert model_device(holder) == torch.device("cpu") == model_device(nn.Module())
    code = make_code(2, (3, 4), "gaussian", 2.0, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(code, 2.0 * torch.randn((1, 2, 3, 4), generator=torch.Generator().manual_seed(0)))
    assert make_code(1, 5, "uniform", 0.1, torch.Generator(), "cpu").shape == (1, 1, 5, 5)
