"""tunix-rt SFT job: fine-tune Gemma on reasoning traces with Tunix, evaluate before and after."""

__version__ = "0.1.0"

from job import tunix_compat  # noqa: E402

# Before anything imports tunix: its package __init__ would pull in its RL stack (tunix_compat says why).
tunix_compat.register_tunix_without_its_init()
