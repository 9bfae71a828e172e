"""The CLIP tokenizer wrapper against transformers' own CLIP tokenizer, offline, and the
word-level vocabulary writer."""

import json
import warnings

import numpy as np
import pytest

import transformers

from unclip_jax.tokenizer import (EOS_TOKEN, BOS_TOKEN, PromptTruncatedWarning, bytes_to_unicode,  # noqa: E402
                                  find_tokenizer_dir, load_tokenizer, write_word_level_vocab)

# Hand-written merges (each result is a vocab entry), independent of write_word_level_vocab.
MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "p h", "o t", "ph ot", "phot o</w>",
          "o f</w>", "a n", "an d</w>", "c a", "e s</w>", "é s</w>", "f é"]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tok")
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    merges = list(dict.fromkeys(MERGES))
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                     encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return path


def _reference(folder):
    """transformers' CLIP tokenizer built from the vocab/merges contents (not our loader)."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return transformers.CLIPTokenizerFast(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)


PROMPTS = [
    "",
    "a photo of the cat and the dog",
    "A PHOTO   of\tthe\nCAT!!",
    "the cat " * 60,                      # 120 BPE tokens: truncated
    "café naïve résumé",                  # non-ASCII
    "😀 cat 🐱🐶 dog",                      # emoji (4-byte UTF-8)
    "日本語のテキスト",
    "x" * 75,                              # exactly 77 with start/end: not truncated
]


def test_ids_match_transformers_clip_tokenizer(vocab_dir):
    ours = load_tokenizer(str(vocab_dir))
    ref = _reference(vocab_dir)
    with pytest.warns(PromptTruncatedWarning, match="#3"):
        got = ours(PROMPTS)
    want = ref(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    assert got.input_ids.shape == got.attention_mask.shape == (len(PROMPTS), 77)
    assert got.input_ids.dtype == np.int32 and got.attention_mask.dtype == bool
    np.testing.assert_array_equal(got.input_ids, want["input_ids"])
    np.testing.assert_array_equal(got.attention_mask, want["attention_mask"].astype(bool))


def test_layout_of_ids(vocab_dir):
    tok = load_tokenizer(str(vocab_dir))
    assert tok.pad_token_id == 0  # "!" as Karlo / diffusers' Karlo pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short prompts must not warn
        ids, mask = tok(["", "the cat", "x" * 75])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    vocab = tok.hf.get_vocab()
    assert ids[0, :2].tolist() == [bos, eos] and not ids[0, 2:].any() and mask[0].sum() == 2
    assert ids[1, :4].tolist() == [bos, vocab["the</w>"], vocab["cat</w>"], eos]
    assert mask[1].tolist() == [True] * 4 + [False] * 73 and not ids[1, 4:].any()
    assert ids[2, -1] == eos and mask[2].all()
    with pytest.warns(PromptTruncatedWarning):
        long_ids, long_mask = tok("the cat " * 60)
    assert long_ids.shape == (1, 77) and long_mask.all() and long_ids[0, -1] == eos
    assert long_ids[0, 1:-1].tolist() == [vocab["the</w>"], vocab["cat</w>"]] * 37 + [vocab["the</w>"]]
    assert tok.decode(ids[1]) == "the cat"


def test_missing_directory_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download openai/clip-vit-large-patch14"):
        load_tokenizer(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(str(tmp_path))


def test_pipeline_folder_with_tokenizer_subfolder(vocab_dir, tmp_path):
    sub = tmp_path / "pipeline" / "tokenizer"
    sub.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (sub / name).write_bytes((vocab_dir / name).read_bytes())
    assert find_tokenizer_dir(str(tmp_path / "pipeline")) == str(sub)
    assert load_tokenizer(str(tmp_path / "pipeline"))("the cat").input_ids[0, 1] > 0


# Words chosen so that naive left-to-right merge chains would clash ("ai" inside "raid",
# "a" alone, shared prefixes and suffixes, a non-ASCII letter).
WORDS = ["red", "reed", "raid", "ai", "a", "circle", "square", "triangle", "Blue", "green", "re", "ed",
         "small", "large", "über", "dragon", "on", "ago", "go"]


def test_word_level_vocab_makes_every_word_one_token(tmp_path):
    write_word_level_vocab(WORDS, str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["!"] == 0 and vocab[EOS_TOKEN] == len(vocab) - 1 and vocab[BOS_TOKEN] == len(vocab) - 2

    ref = _reference(tmp_path)
    b2u = bytes_to_unicode()  # vocab entries are byte-level strings ("ü" is "Ã¼")
    for word in WORDS:
        expected = vocab["".join(b2u[b] for b in word.lower().encode("utf-8")) + "</w>"]
        assert ref(word)["input_ids"] == [vocab[BOS_TOKEN], expected, vocab[EOS_TOKEN]], word

    tok = load_tokenizer(str(tmp_path))
    ids, mask = tok(["a red circle over a large triangle", "REED"])
    # "over" is not a word of the vocabulary: it falls back to the characters o, v, e, r</w>.
    pieces = ["a</w>", "red</w>", "circle</w>", "o", "v", "e", "r</w>", "a</w>", "large</w>", "triangle</w>"]
    want = [vocab[BOS_TOKEN]] + [vocab[p] for p in pieces] + [vocab[EOS_TOKEN]]
    assert ids[0, : len(want)].tolist() == want and mask[0].sum() == len(want)
    assert ids[1, :3].tolist() == [vocab[BOS_TOKEN], vocab["reed</w>"], vocab[EOS_TOKEN]]


def test_word_level_vocab_rejects_non_words(tmp_path):
    for bad in (["two words"], ["r2d2"], ["semi-colon"], []):
        with pytest.raises(ValueError):
            write_word_level_vocab(bad, str(tmp_path))
