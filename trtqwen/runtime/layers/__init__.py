"""The few layers Qwen2 needs, one idea a file: linear (+ TP weight slicing), attention, rotary, norm, quant, sampler."""
