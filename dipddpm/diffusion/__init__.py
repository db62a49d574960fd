"""The diffusion core shared by every DDPM method: training, samplers, checkpoint cache."""

from dipddpm.diffusion.checkpoints import checkpoint_key, load_or_train, load_or_train_with_info
from dipddpm.diffusion.sampling import SampleResult, ancestral_sample, ddim_sample, ddim_timesteps, predict_x0
from dipddpm.diffusion.training import TrainResult, train_eps

__all__ = [
    "SampleResult",
    "TrainResult",
    "ancestral_sample",
    "checkpoint_key",
    "ddim_sample",
    "ddim_timesteps",
    "load_or_train",
    "load_or_train_with_info",
    "predict_x0",
    "train_eps",
]
