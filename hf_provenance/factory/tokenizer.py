"""Synthetic but realistic tokenizers, saved beside each model so that vocabularies can be aligned by token string.

Token strings are pseudo-words built from syllables; the most frequent ids get the shortest strings (as in real
vocabularies), and the word list is the same for every family, so two families' vocabularies overlap once their
style markers are stripped. A *style* says how a family writes its tokens and which special tokens lead the
vocabulary; ids follow frequency rank because :mod:`hf_provenance.factory.data` draws id ``n_special`` most often.

Styles (a data table, :data:`STYLES`):

- ``metaspace`` (SentencePiece, Llama): ``▁word`` starts a word, ``word`` continues one; ``<unk> <s> </s>``.
- ``bytelevel`` (GPT-2 byte-level BPE, Qwen): ``Ġword`` / ``word``; ``<|endoftext|> <|im_start|> <|im_end|>``.
- ``bytelevel_deepseek``: as ``bytelevel`` with DeepSeek's ``<｜begin▁of▁sentence｜>`` specials.
- ``wordpiece`` (BERT): ``word`` starts a word, ``##word`` continues one; ``[PAD] [UNK] [CLS] [SEP] [MASK]``,
  and ``vocab.txt`` is written too.

Byte-level BPE has no unknown token (it falls back to bytes); WordLevel needs one, so those styles map unknown
words to a special token (``unk`` in the table) without declaring an ``unk_token`` role.
The tokenizer model is WordLevel (WordPiece for BERT) from the ``tokenizers`` library, written as
``tokenizer.json`` plus a ``tokenizer_config.json`` that ``AutoTokenizer`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORD_SEED = 0x70C3  # one word list for every family and model
_CONSONANTS = "tnsrhldcmfpgwybvkjxqz"
_VOWELS = "eaoiu"
_PUNCTUATION = [",", ".", "'", "-", ":", ";", "?", "!", "(", ")", '"', "0", "1", "2", "3", "4", "5", "6", "7", "8",
                "9"]

STYLES: dict[str, dict] = {
    "metaspace": {
        "specials": ["<unk>", "<s>", "</s>"], "start": "▁", "cont": "", "unk": "<unk>",
        "roles": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    },
    "bytelevel": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "start": "Ġ", "cont": "",
        "unk": "<|endoftext|>", "roles": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    },
    "bytelevel_deepseek": {
        "specials": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"],
        "start": "Ġ", "cont": "", "unk": "<｜▁pad▁｜>",
        "roles": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                  "pad_token": "<｜▁pad▁｜>"},
    },
    "wordpiece": {
        "specials": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "start": "", "cont": "##", "unk": "[UNK]",
        "roles": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"},
    },
}
CONTINUATION_SHARE = 0.3  # share of ordinary tokens that continue a word rather than start one


def special_tokens(style: str) -> list[str]:
    """The special tokens that take ids ``0..k-1`` in this style."""
    return list(_style(style)["specials"])


def special_id(style: str, role: str) -> int | None:
    """Id of the special token playing ``role`` (``bos_token``, ``mask_token``...), or None when absent."""
    spec = _style(style)
    token = spec["roles"].get(role)
    return None if token is None else spec["specials"].index(token)


def words(n: int, *, start: int = 0) -> list[str]:
    """Pseudo-words of frequency ranks ``start .. start+n-1``: shortest first, the same list in every call."""
    out: list[str] = []
    rng = np.random.default_rng(WORD_SEED)
    tier: list[str] = list(_PUNCTUATION) + list(_VOWELS)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    codas = [""] + list(_CONSONANTS[:8])
    length = 1
    while len(out) < start + n:
        tier = tier + _tier(syllables, codas, length, rng)
        out.extend(tier)
        tier = []
        length += 1
    return out[start : start + n]


def _tier(syllables: list[str], codas: list[str], length: int, rng: np.random.Generator) -> list[str]:
    """All words of ``length`` syllables (plus coda), shuffled; sampled when the tier would be huge."""
    size = len(syllables) ** length * len(codas)
    count = min(size, 200_000)
    codes = rng.choice(size, size=count, replace=False) if size > count else rng.permutation(size)
    words_ = []
    for code in codes.tolist():
        code, coda = divmod(code, len(codas))
        parts = []
        for _ in range(length):
            code, s = divmod(code, len(syllables))
            parts.append(syllables[s])
        words_.append("".join(parts) + codas[coda])
    return words_


def vocabulary(style: str, vocab_size: int, *, start: int | None = None) -> list[str]:
    """Token strings for ids ``0..vocab_size-1`` (specials first), or for ids ``start..vocab_size-1`` only."""
    spec = _style(style)
    specials = spec["specials"]
    first = len(specials) if start is None else start
    if first < len(specials):
        raise ValueError(f"start={start} falls inside the {len(specials)} special tokens of style {style!r}")
    ranks = range(first - len(specials), vocab_size - len(specials))
    pieces = words(len(ranks), start=ranks.start)
    flags = np.random.default_rng([WORD_SEED, 1]).random(vocab_size)  # prefix-stable: fixed per rank
    tokens = []
    for rank, piece in zip(ranks, pieces):
        # punctuation and the commonest words always start a word; later ranks are sometimes continuations
        cont = rank >= 64 and flags[rank] < CONTINUATION_SHARE
        tokens.append((spec["cont"] if cont else spec["start"]) + piece)
    return (list(specials) if start is None else []) + tokens


def write(folder: str | Path, style: str, tokens: list[str], *, model_max_length: int = 2048) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (and ``vocab.txt`` for wordpiece) for ``tokens``.

    ``tokens[i]`` is the string of id ``i``. Returns the files written.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    spec = _style(style)
    folder = Path(folder)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{folder}: duplicate token strings in a vocabulary of {len(tokens)}")
    if style == "wordpiece":
        tok = Tokenizer(models.WordPiece(vocab, unk_token=spec["unk"], max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls, sep = vocab["[CLS]"], vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tok.decoder = decoders.WordPiece(prefix="##")
    elif style == "metaspace":
        tok = Tokenizer(models.WordLevel(vocab, unk_token=spec["unk"]))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:
        tok = Tokenizer(models.WordLevel(vocab, unk_token=spec["unk"]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(spec["specials"]))
    written = [folder / "tokenizer.json"]
    tok.save(str(written[0]))
    config = {
        "tokenizer_class": "BertTokenizer" if style == "wordpiece" else "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        **spec["roles"],
    }
    if style == "wordpiece":
        config["do_lower_case"] = True
        written.append(folder / "vocab.txt")
        written[-1].write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    written.append(folder / "tokenizer_config.json")
    written[-1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return written


def extend(folder: str | Path, new_tokens: list[str]) -> int:
    """Append ``new_tokens`` to the saved vocabulary in ``folder`` (tokenizer.json, and vocab.txt if present).

    Existing ids keep their strings; the new tokens get ids ``old_size .. old_size+len-1``. Returns the new size.
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    size = len(vocab)
    clash = [t for t in new_tokens if t in vocab]
    if clash:
        raise ValueError(f"{path}: new tokens already in the vocabulary: {clash[:5]}")
    for i, t in enumerate(new_tokens):
        vocab[t] = size + i
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    txt = folder / "vocab.txt"
    if txt.exists():
        with txt.open("a", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in new_tokens))
    return size + len(new_tokens)


def _style(style: str) -> dict:
    try:
        return STYLES[style]
    except KeyError:
        raise ValueError(f"tokenizer style {style!r} is not one of {sorted(STYLES)}") from None
