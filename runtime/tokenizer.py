"""Tokenizer loading: the model folder's Hugging Face fast tokenizer, or a built-in byte tokenizer.

`load_tokenizer(resolved)` returns a `transformers.PreTrainedTokenizerFast` (the
`tokenizers`-backed class; encode, decode, special tokens, `chat_template`), read from
`resolved.tokenizer_path` without any network access. When a resolved model has no tokenizer
(`tokenizer_path is None`: a random-weight shape whose vocabulary is smaller than the default
model's tokenizer, or a model folder shipped without tokenizer files) it returns the built-in
byte-level tokenizer below instead.

The byte-level tokenizer is for benchmarks that send token ids and for smoke tests, not for
meaningful text: token id b (0..255) is the byte b of the UTF-8 text, then five special tokens

    256 <|bos|>   257 <|eos|>   258 <|pad|>   259 <|im_start|>   260 <|im_end|>

so any text round-trips, any model vocabulary of at least 261 ids can use it (ids >= 261 decode
to nothing), and its ChatML chat template makes chat requests work. It is a real
`PreTrainedTokenizerFast` (a byte-level BPE without merges), so everything that accepts a Hugging
Face tokenizer (detokenizer, grammar engine) accepts it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

    from .loader import ResolvedModel

logger = logging.getLogger(__name__)

__all__ = ["load_tokenizer", "byte_level_tokenizer", "BYTE_TOKENIZER_VOCAB_SIZE"]

_BYTE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
#: Ids the byte-level tokenizer uses: 256 bytes + its special tokens.
BYTE_TOKENIZER_VOCAB_SIZE = 256 + len(_BYTE_SPECIALS)

_BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(resolved: ResolvedModel) -> Any:
    """The tokenizer of a resolved model (see the module docstring); never downloads."""
    path = resolved.tokenizer_path
    if path is None:
        logger.info("%s has no tokenizer; using the built-in byte-level tokenizer", resolved.name)
        tok = byte_level_tokenizer()
        if resolved.config.vocab_size < BYTE_TOKENIZER_VOCAB_SIZE:
            raise ValueError(
                f"model {resolved.name!r} has a vocabulary of {resolved.config.vocab_size} ids, fewer than the "
                f"{BYTE_TOKENIZER_VOCAB_SIZE} the built-in byte-level tokenizer needs"
            )
        return tok
    return load_tokenizer_from_dir(path)


def load_tokenizer_from_dir(path: Path | str) -> PreTrainedTokenizerFast:
    """The fast tokenizer saved in folder `path` (tokenizer.json + tokenizer_config.json)."""
    path = Path(path)
    if not path.is_dir() or not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {path}: expected {' and '.join(_TOKENIZER_FILES)}")
    tok = _tokenizer_class(path).from_pretrained(str(path), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"the tokenizer in {path} is not a fast (tokenizers-backed) tokenizer")
    return tok


def _tokenizer_class(path: Path) -> type:
    """The tokenizer class named in tokenizer_config.json, else the generic fast tokenizer.

    Not AutoTokenizer: it also loads the model's config class, which imports the modeling
    stack of transformers and costs seconds at every start.
    """
    from transformers import PreTrainedTokenizerFast

    name = None
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        try:
            name = json.loads(config_file.read_text()).get("tokenizer_class")
        except ValueError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if not name:
        return PreTrainedTokenizerFast
    try:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    except ImportError:  # pragma: no cover - a transformers without this helper
        return PreTrainedTokenizerFast
    cls = tokenizer_class_from_name(name) or tokenizer_class_from_name(name.removesuffix("Fast"))
    return cls or PreTrainedTokenizerFast


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255 (ByteLevel's alphabet):
    printable Latin-1 bytes map to themselves, the others to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars: list[str] = []
    extra = 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A new built-in byte-level tokenizer (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    for i, tok in enumerate(_BYTE_SPECIALS):
        vocab[tok] = 256 + i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: every byte of the text becomes exactly one token.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _BYTE_SPECIALS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1 << 30,
    )
    tok.chat_template = _BYTE_CHAT_TEMPLATE
    return tok
