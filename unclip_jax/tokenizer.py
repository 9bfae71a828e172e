"""The CLIP tokenizer: transformers' ``CLIPTokenizerFast`` behind a small numpy interface.

``tokenize(prompts)`` gives, for each prompt, ``<|startoftext|>`` + byte-level BPE tokens +
``<|endoftext|>``, padded to 77 positions with the id of ``"!"`` (0 in CLIP vocabularies),
as Karlo and diffusers' Karlo pipeline (``pad_token="!"``) do:

- ``input_ids``: (B, 77) int32;
- ``attention_mask``: (B, 77) bool, True on the real tokens including both special tokens.

A prompt longer than 77 tokens keeps its first 75 BPE tokens and its end-of-text token (as
OpenAI's ``tokenize(truncate=True)`` and transformers' ``truncation=True``), with a
:class:`PromptTruncatedWarning`. Empty, non-ASCII and emoji prompts work (byte-level BPE
has no unknown characters).

:func:`write_word_level_vocab` writes a small CLIP-format vocabulary (``vocab.json`` +
``merges.txt``) in which each given word is a single token, for recipes that ship their
own tokenizer (the embedded shapes dataset).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import warnings
from typing import NamedTuple, Sequence

import numpy as np

CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"

_GET_IT = ("get the tokenizer files on a machine with network, e.g. `hf download "
           "openai/clip-vit-large-patch14 --include '*.json' '*.txt' --local-dir DIR`, and pass DIR "
           "(a diffusers pipeline folder with a tokenizer/ sub-folder also works)")


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the context length and was cut."""


class TokenizedText(NamedTuple):
    input_ids: np.ndarray       # (B, L) int32
    attention_mask: np.ndarray  # (B, L) bool, True on real tokens


def _has_tokenizer_files(path: str) -> bool:
    return (os.path.exists(os.path.join(path, "tokenizer.json"))
            or (os.path.exists(os.path.join(path, "vocab.json")) and os.path.exists(os.path.join(path, "merges.txt"))))


def find_tokenizer_dir(path: str) -> str:
    """``path`` itself or its ``tokenizer/`` sub-folder, whichever holds the tokenizer files."""
    for candidate in (path, os.path.join(path, "tokenizer")):
        if os.path.isdir(candidate) and _has_tokenizer_files(candidate):
            return candidate
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist; {_GET_IT}")
    raise FileNotFoundError(f"{path!r} holds no CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                            f"{_GET_IT}")


class CLIPTokenizer:
    """Tokenizes prompts into fixed-length numpy arrays (see the module docstring).

    Build with :meth:`from_directory`; wraps a transformers ``CLIPTokenizerFast``.
    """

    def __init__(self, hf_tokenizer, max_length: int = CONTEXT_LENGTH):
        self.hf = hf_tokenizer
        self.max_length = int(max_length)
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (start and end tokens); got {max_length}")
        vocab = hf_tokenizer.get_vocab()
        for token in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN):
            if token not in vocab:
                raise ValueError(f"the tokenizer vocabulary lacks {token!r}; is this a CLIP tokenizer?")
        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]
        self.pad_token_id = vocab[PAD_TOKEN]
        self.vocab_size = len(vocab)

    @classmethod
    def from_directory(cls, path: str, max_length: int = CONTEXT_LENGTH) -> "CLIPTokenizer":
        """Loads from a local directory (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``),
        or from a diffusers pipeline folder's ``tokenizer/``. Never touches the network."""
        from transformers import CLIPTokenizerFast
        folder = find_tokenizer_dir(path)
        hf = CLIPTokenizerFast.from_pretrained(folder, pad_token=PAD_TOKEN, model_max_length=max_length,
                                               local_files_only=True)
        return cls(hf, max_length)

    def encode(self, prompt: str) -> list[int]:
        """Untruncated ids of one prompt: [bos, BPE..., eos]."""
        return list(self.hf(prompt, add_special_tokens=True, truncation=False, padding=False,
                            verbose=False)["input_ids"])

    def __call__(self, prompts: str | Sequence[str]) -> TokenizedText:
        """Prompts (a string or a sequence of B strings) -> :class:`TokenizedText` (B, max_length)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings; items {bad} are not")
        length = self.max_length
        ids = np.full((len(prompts), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(prompts), length), bool)
        truncated = []
        encoded = self.hf(prompts, add_special_tokens=True, truncation=False, padding=False,
                          verbose=False)["input_ids"] if prompts else []
        for row, tokens in enumerate(encoded):
            if len(tokens) > length:
                truncated.append((row, len(tokens)))
                tokens = list(tokens[: length - 1]) + [self.eos_token_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = True
        if truncated:
            detail = ", ".join(f"#{row} ({n} tokens)" for row, n in truncated[:5])
            more = f" and {len(truncated) - 5} more" if len(truncated) > 5 else ""
            warnings.warn(f"{len(truncated)} prompt(s) longer than {length} tokens were truncated: "
                          f"{detail}{more}", PromptTruncatedWarning, stacklevel=2)
        return TokenizedText(ids, mask)

    def decode(self, input_ids: Sequence[int]) -> str:
        """Text of one row of ids, without special and padding tokens."""
        ids = [int(i) for i in input_ids]
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return self.hf.decode([i for i in ids if i != self.bos_token_id])


def load_tokenizer(path: str, max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
    """Shorthand for :meth:`CLIPTokenizer.from_directory`."""
    return CLIPTokenizer.from_directory(path, max_length)


# ----------------------------------------------------------------------------- word-level vocab

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (the BPE alphabet), in CLIP's vocab order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies merges lowest rank first (all occurrences, left to right), as CLIP's BPE."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(p, None), i, p) for i, p in enumerate(zip(symbols, symbols[1:]))]
        pairs = [x for x in pairs if x[0] is not None]
        if not pairs:
            break
        best = min(pairs)[2]
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _normalise_word(word: str) -> str:
    w = unicodedata.normalize("NFC", word).lower()
    if not re.fullmatch(r"[^\W\d_]+", w):
        raise ValueError(f"{word!r} is not a single word of letters; CLIP's pre-tokenizer would split it")
    return w


def write_word_level_vocab(words: Sequence[str], out_dir: str, *, verify: bool = True) -> str:
    """Writes ``vocab.json`` + ``merges.txt`` where every word in ``words`` is one token.

    The vocabulary has CLIP's layout: the 256 byte characters (``"!"`` is id 0, the padding
    id), the same with the end-of-word mark ``</w>``, one entry per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the two largest ids). Other text still
    tokenizes, character by character. Words are lower-cased letters (CLIP lower-cases).

    Merges are found greedily: while some word does not come out as one token under the
    merges so far, append the merge of its first two current pieces (lowest priority, so
    earlier words keep their segmentation); every word's piece count only falls, so this
    ends. With ``verify`` the files are loaded with :class:`CLIPTokenizer` and each word is
    checked to be a single token.

    Returns ``out_dir``.
    """
    byte_chars = bytes_to_unicode()
    unique = list(dict.fromkeys(_normalise_word(w) for w in words))
    if not unique:
        raise ValueError("write_word_level_vocab needs at least one word")

    def initial(word: str) -> list[str]:
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        return chars[:-1] + [chars[-1] + "</w>"]

    base = list(byte_chars.values())
    vocab: dict[str, int] = {c: i for i, c in enumerate(base + [c + "</w>" for c in base])}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    pending = True
    while pending:
        pending = False
        for word in unique:
            pieces = _bpe(initial(word), ranks)
            if len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                pending = True
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)

    if verify:
        tok = CLIPTokenizer.from_directory(out_dir)
        split = [w for w in unique if len(tok.encode(w)) != 3]
        if split:
            raise RuntimeError(f"words not single tokens under the written vocabulary: {split[:10]}")
    return out_dir
