"""Everything before a model repository exists: spec, plan, fetch, quantize, export, engine build, verify."""
