"""Developer tools: the GPU-readiness gate (``python -m bpo_fast.tools.gpu_check``)."""
