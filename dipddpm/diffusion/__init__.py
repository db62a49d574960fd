"""The diffusion core shared by every DDPM method: schedules and their formulas, training,
samplers (ancestral | ddim, respaced to any number of network calls), checkpoint cache."""

from dipddpm.diffusion.checkpoints import (
    checkpoint_key,
    load_or_train_with_info,
    load_sample_grids,
    save_sample_grids,
)
from dipddpm.diffusion.sampling import (
    SAMPLERS,
    SampleResult,
    Sampler,
    chain_timesteps,
    sample,
    sample_options,
    validate_sample_config,
)
from dipddpm.diffusion.schedule import NoiseSchedule, build_schedule
from dipddpm.diffusion.training import TrainResult, train_eps

__all__ = [
    "SAMPLERS",
    "NoiseSchedule",
    "SampleResult",
    "Sampler",
    "TrainResult",
    "build_schedule",
    "chain_timesteps",
    "checkpoint_key",
    "load_or_train_with_info",
    "load_sample_grids",
    "sample",
    "sample_options",
    "save_sample_grids",
    "train_eps",
    "validate_sample_config",
]
