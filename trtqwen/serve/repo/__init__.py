"""Triton model repository generator (tensorrtllm_backend layout) and the python models it ships."""

from trtqwen.serve.repo.checks import check_engine_compatible
from trtqwen.serve.repo.generate import generate_repo
from trtqwen.serve.repo.record import check_repo_servable, read_record
from trtqwen.serve.repo.settings import RUNTIMES

__all__ = ["RUNTIMES", "check_repo_servable", "check_engine_compatible", "generate_repo", "read_record"]
