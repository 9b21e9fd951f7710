"""Installed package versions: what a build records, what doctor shows, what the serve gate compares."""

from __future__ import annotations

import importlib.metadata
import platform


def package_version(*dists: str) -> str | None:
    """The version of the first of these distributions that is installed (a package may go by several names)."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("trtqwen", "torch", "transformers", "nvidia-modelopt", "safetensors", "tensorrt_llm", "tensorrt"):
        versions[dist] = package_version(dist)
    return versions
