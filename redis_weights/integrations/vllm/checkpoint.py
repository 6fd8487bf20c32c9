"""The names, shapes and dtypes of the checkpoint a vLLM engine was started from.

A pushed version must carry exactly these tensors (the model's own Hugging Face
names): the receiver checks a manifest against them before it fetches a byte, so a
version that ``load_weights`` would reject part-way is refused with the model untouched.
Read from the safetensors headers only (no tensor data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ...errors import ConfigurationError

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def checkpoint_files(model_config: Any) -> list[Path]:
    """The ``.safetensors`` files of the engine's model: its directory, else the Hugging Face cache."""
    model = str(getattr(model_config, "model_weights", "") or model_config.model)
    if os.path.isdir(model):
        directory = Path(model)
    else:
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(model, revision=getattr(model_config, "revision", None),
                                               allow_patterns=["*.safetensors"], local_files_only=True))  # fmt: skip
        except Exception as exc:
            raise ConfigurationError(f"cannot find the checkpoint of {model!r} on this host: {exc}") from exc
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigurationError(f"{directory} holds no .safetensors file: the redis backend checks versions "
                                 "against the checkpoint's names and shapes")  # fmt: skip
    return files


def checkpoint_spec(model_config: Any) -> Spec:
    """``{name: (shape, dtype)}`` of every tensor of the engine's checkpoint."""
    spec: Spec = {}
    for path in checkpoint_files(model_config):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = f.get_slice(name)
                code = piece.get_dtype()
                if code not in _DTYPES:  # fmt: skip
                    raise ConfigurationError(f"{path}: tensor {name!r} has dtype {code}, not one this backend reads")
                spec[name] = (tuple(piece.get_shape()), _DTYPES[code])
    return spec
