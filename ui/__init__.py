"""trtqwen's Gradio web demo: `trtqwen ui` (ui/app.py) streaming from a Triton server (ui/backend.py)."""
