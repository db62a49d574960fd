"""dipddpm: experiments combining Deep Image Prior (DIP) with denoising diffusion (DDPM)."""

__version__ = "0.1.0"
