import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from dipddpm.data.images import add_gaussian_noise, load_observation
from dipddpm.errors import ConfigError


def data_cfg(**over):
    base = dict(name="image", image="astronaut", path=None, folder=None, size=32, grayscale=False,
                sigma=0.1, clip=True, noise_seed=0)
    base.update(over)
    return OmegaConf.create(base)


def test_bundled_image_shape_range_and_noise_seed():
    obs = load_observation(data_cfg())
    assert obs.clean.shape == (32, 32, 3) and obs.clean.dtype == np.float32
    assert 0.0 <= obs.clean.min() and obs.clean.max() <= 1.0
    again = load_observation(data_cfg())
    np.testing.assert_array_equal(obs.noisy, again.noisy)
    other = load_observation(data_cfg(noise_seed=1))
    assert not np.array_equal(obs.noisy, other.noisy)
    # the noise is clean + sigma * N(0,1) from numpy's default_rng(noise_seed), then clipped
    expected = np.clip(obs.clean + 0.1 * np.random.default_rng(0).standard_normal(obs.clean.shape).astype(np.float32), 0, 1)
    np.testing.assert_allclose(obs.noisy, expected, atol=1e-7)


def test_unclipped_noise_has_the_requested_std():
    clean = np.full((64, 64, 3), 0.5, dtype=np.float32)
    noisy = add_gaussian_noise(clean, 0.2, clip=False, seed=3)
    assert abs(float((noisy - clean).std()) - 0.2) < 0.01


def test_file_centre_crop_resize_and_grayscale(tmp_path):
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[:, 10:50] = 255  # the centre 40x40 square is white
    path = tmp_path / "wide.png"
    Image.fromarray(array).save(path)
    obs = load_observation(data_cfg(path=str(path), size=20, sigma=0.0))
    assert obs.clean.shape == (20, 20, 3)
    assert obs.clean.min() > 0.99
    gray = load_observation(data_cfg(path=str(path), size=None, grayscale=True, sigma=0.0))
    assert gray.clean.shape == (40, 40, 1)
    assert obs.name == "wide"


def test_folder_source_by_stem(tmp_path):
    for name in ("b", "a"):
        Image.fromarray(np.full((16, 16, 3), 100, dtype=np.uint8)).save(tmp_path / f"{name}.png")
    obs = load_observation(data_cfg(folder=str(tmp_path), image="b", size=None))
    assert obs.name == "b" and obs.clean.shape == (16, 16, 3)
    with pytest.raises(ConfigError, match="data.image='zzz'.*a, b"):
        load_observation(data_cfg(folder=str(tmp_path), image="zzz"))


@pytest.mark.parametrize("over,key", [
    (dict(path="/no/such.png"), "data.path"),
    (dict(image="lenna"), "data.image"),
    (dict(sigma=1.5), "data.sigma"),
    (dict(sigma=-0.1), "data.sigma"),
    (dict(size=3), "data.size"),
    (dict(folder="/no/such/folder"), "data.folder"),
])
def test_bad_data_config_names_the_key(over, key):
    with pytest.raises(ConfigError) as info:
        load_observation(data_cfg(**over))
    assert str(info.value).startswith(key + "=")
    assert "\n" not in str(info.value)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="data.path=.*readable image"):
        load_observation(data_cfg(path=str(bad)))


def test_fit_crop_takes_the_centre_pixels_unresized(tmp_path):
    """data.fit=crop: the centre size x size pixels as they are; larger than the image is a ConfigError."""
    from dipddpm.data.images import validate_image_config

    pixels = (np.arange(10 * 12 * 3) % 256).astype(np.uint8).reshape(10, 12, 3)
    path = tmp_path / "ramp.png"
    Image.fromarray(pixels).save(path)
    cfg = OmegaConf.create({"name": "image", "image": None, "path": str(path), "folder": None, "size": 8,
                            "fit": "crop", "grayscale": False, "sigma": 0.0, "clip": True, "noise_seed": 0})
    clean = load_observation(cfg).clean
    np.testing.assert_allclose(clean, pixels[1:9, 2:10].astype(np.float32) / 255.0)
    cfg.size = 11
    with pytest.raises(ConfigError, match="data.size=11 .*at most 10"):
        validate_image_config(cfg)
    cfg.size, cfg.fit = 8, "pad"
    with pytest.raises(ConfigError, match="data.fit"):
        validate_image_config(cfg)
