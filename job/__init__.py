"""tunix-rt SFT job: fine-tune Gemma on reasoning traces with Tunix, evaluate before and after."""

import importlib.util
import sys

__version__ = "0.1.0"


def _register_tunix_without_its_init() -> None:
    """Tunix's package __init__ imports its RL and distillation trainers (and pandas with them): over a
    second of every start, none of it used here. Register the package without running that file; its
    submodules (tunix.sft, tunix.generate, tunix.models) import as usual."""
    if "tunix" not in sys.modules and (spec := importlib.util.find_spec("tunix")) is not None:
        sys.modules["tunix"] = importlib.util.module_from_spec(spec)


_register_tunix_without_its_init()
