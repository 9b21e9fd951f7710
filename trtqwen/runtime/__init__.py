"""Reference runtime: Qwen2 inference in PyTorch over TensorRT-LLM or HF checkpoints, with continuous batching.

Stands in for the TensorRT-LLM engine where it cannot run, and checks checkpoints (`trtqwen verify`).
"""

from trtqwen.runtime.config import ModelConfig
from trtqwen.runtime.engine import LLMEngine, Request
from trtqwen.runtime.loader import load_model
from trtqwen.runtime.sampling import SamplingParams

__all__ = ["ModelConfig", "LLMEngine", "Request", "SamplingParams", "load_model"]
