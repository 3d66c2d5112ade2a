"""Developer tools: the GPU-readiness gate (``python -m bpo_fast.tools.gpu_check``) and the
README option tables (``python -m bpo_fast.tools.readme_tables README.md``)."""
