"""Serving: the Triton model repository (repo/) and tritonserver itself (server, supervisor)."""
