"""Hides the modules named in $CORRAL_HIDE_MODULES in every Python process of a vllm-cpu backend.

`backends/vllm_cpu.py` puts this directory on PYTHONPATH, so the interpreters vLLM starts
(engine processes, model-inspection subprocesses) run this at startup and treat the CUDA-built
torch extensions it found as not installed.
"""

import os
import sys

for _name in filter(None, os.environ.get("CORRAL_HIDE_MODULES", "").split(",")):
    sys.modules[_name] = None  # type: ignore[assignment]
