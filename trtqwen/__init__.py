"""trtqwen: build, package and serve Qwen2 models with TensorRT-LLM on RTX 4090D GPUs."""

__version__ = "0.1.0"
