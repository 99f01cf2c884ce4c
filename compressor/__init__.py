"""modegpt compressor: training-free MoDeGPT decomposition of causal LMs into ModeGPT checkpoints.

Importing this package registers the ``modegpt`` architecture with transformers' ``Auto*`` classes.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .modeling import ModeGPTConfig, ModeGPTForCausalLM

__version__ = "0.1.0"

AutoConfig.register("modegpt", ModeGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(ModeGPTConfig, ModeGPTForCausalLM, exist_ok=True)

__all__ = ["ModeGPTConfig", "ModeGPTForCausalLM", "__version__"]
