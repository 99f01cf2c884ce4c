"""Any MODEL spec or ModeGPT checkpoint -> (ModeGPT config, state dict, tokenizer).

This is the boundary between the compressor and everything downstream: the engine and the HF model
class see only the ModeGPT representation, for original and compressed models alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import is_checkpoint, read_checkpoint
from .families import family_for, hf_name, modegpt_config
from .schema import global_weights, layer_weights
from .sources import SMOLLM2_ALIAS, SourceModel, resolve


@dataclass
class LoadedModel:
    model_id: str
    config: dict
    state_dict: dict[str, torch.Tensor]
    tokenizer: object | None
    path: Path | None = None

    def hf_model(self):
        from .modeling import ModeGPTForCausalLM

        return ModeGPTForCausalLM.from_modegpt(self.config, self.state_dict)


def convert_weights(source: SourceModel, cfg: dict, names: dict[str, tuple], device="cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read the source weights named by ModeGPT ``names`` (a missing bias becomes zeros)."""
    family = family_for(source.hf_config["model_type"])
    out = {}
    for name, shape in names.items():
        theirs = hf_name(family, name)
        t = source.weights.get(theirs, device) if theirs else None
        if t is None:
            if not name.endswith(".bias"):
                raise KeyError(f"{source.spec}: weight {theirs or name} is missing")
            t = torch.zeros(shape, device=device, dtype=dtype or source.dtype)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{source.spec}: {theirs} has shape {tuple(t.shape)}, expected {shape}")
        out[name] = t.to(dtype) if dtype is not None else t
    return out


def source_config(source: SourceModel) -> dict:
    cfg = modegpt_config(source.hf_config)
    cfg["torch_dtype"] = str(source.dtype).replace("torch.", "")
    cfg["modegpt"] = {"source": {"spec": source.spec, **source.fingerprint}, "ratio": 0.0}
    return cfg


def source_layer(source: SourceModel, cfg: dict, i: int, device="cpu", dtype=None) -> dict[str, torch.Tensor]:
    return convert_weights(source, cfg, layer_weights(cfg, i), device, dtype)


def source_globals(source: SourceModel, cfg: dict, device="cpu", dtype=None) -> dict[str, torch.Tensor]:
    return convert_weights(source, cfg, global_weights(cfg), device, dtype)


def model_id_for(spec: str) -> str:
    if spec == SMOLLM2_ALIAS or spec.startswith("random:"):
        return spec
    return Path(spec).expanduser().resolve().name.removesuffix(".gguf")


def load_modegpt(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 model_id: str | None = None) -> LoadedModel:
    """Load a ModeGPT checkpoint directory, or convert any MODEL spec to the ModeGPT representation."""
    path = Path(spec).expanduser()
    if path.is_dir() and is_checkpoint(path):
        config, state = read_checkpoint(path, device, dtype)
        tokenizer = None
        if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        return LoadedModel(model_id or path.resolve().name, config, state, tokenizer, path)
    source = resolve(spec)
    cfg = source_config(source)
    state = source_globals(source, cfg, device, dtype)
    for i in range(cfg["num_hidden_layers"]):
        state.update(source_layer(source, cfg, i, device, dtype))
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    return LoadedModel(model_id or model_id_for(spec), cfg, state, source.load_tokenizer(), None)
