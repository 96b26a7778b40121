"""tunix-rt SFT job: fine-tune Gemma on reasoning traces with Tunix, evaluate before and after."""

__version__ = "0.1.0"
