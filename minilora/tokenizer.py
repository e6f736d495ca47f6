"""The tokenizers a run can have, and the one module that makes them.

    CharTokenizer   one token per character of corpus.VOCAB (newline + printable ASCII); the default
    BPETokenizer    a byte-pair encoding read from a Hugging Face tokenizer.json (the `tokenizers` library)

A run's tokenizer is part of its description, like its ModelConfig, and comes
with the model, as picoGPT loads its encoder with the weights:

- every checkpoint's metadata holds `tokenizer.describe()` under "tokenizer":
  {"kind": "char"}, or {"kind": "bpe", "file": "tokenizer.json", "sha256": ...,
  "vocab_size": V};
- a BPE run folder holds that tokenizer.json beside its checkpoint
  (`tokenizer.save(run_dir)`), and `tokenizer_from_meta` reads it back and
  checks its SHA-256, so ids are never decoded by a tokenizer that did not
  make them;
- a checkpoint with no "tokenizer" entry was written before tokenizers were
  recorded, and was made by the character tokenizer.

Both classes have the same surface: encode(text) -> int64 ids (N,),
decode(ids) -> text, vocab_size, kind, describe(), save(run_dir),
problem(text) (why text cannot be encoded, or None) and token_lengths() (the
characters each token stands for, to turn nats per token into nats per
character).

The `tokenizers` package is optional (`pip install 'minilora[hf]'`); it is
imported only when a BPE tokenizer is read.
"""

import hashlib
import os

import numpy as np

from .checkpoint import atomic_open
from .corpus import VOCAB, out_of_vocab_report

TOKENIZER_FILE = "tokenizer.json"  # a BPE run's tokenizer, in its run folder
CHAR_DESCRIPTION = {"kind": "char"}  # what a checkpoint without a "tokenizer" entry means
INSTALL_HINT = "pip install 'minilora[hf]'"

# Code point -> token id, -1 where the character is not in VOCAB.
_ID_OF_CODE = np.full(128, -1, dtype=np.int64)
_ID_OF_CODE[[ord(ch) for ch in VOCAB]] = np.arange(len(VOCAB))


def _check_ids(ids, vocab_size):
    """ids as a 1-D integer array, each in [0, vocab_size); ValueError otherwise."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"decode: ids must be a 1-D integer array, got dtype {ids.dtype} shape {ids.shape}")
    out_of_range = ids[(ids < 0) | (ids >= vocab_size)]
    if out_of_range.size:
        raise ValueError(
            f"decode: ids must lie in [0, {vocab_size}), got {out_of_range.size} outside, "
            f"e.g. {int(out_of_range[0])}"
        )
    return ids


class CharTokenizer:
    """One token per character of VOCAB: token id i is the character VOCAB[i]."""

    kind = "char"
    vocab_size = len(VOCAB)

    def encode(self, text):
        """
        Inputs:
        - text: str made only of characters in VOCAB.

        Returns:
        - ids: int64 array of shape (len(text),).
        """
        if not isinstance(text, str):
            raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
        report = out_of_vocab_report(text)
        if report is not None:
            raise ValueError(f"encode: text has {report}")
        codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        return _ID_OF_CODE[codes]

    def decode(self, ids):
        """
        Inputs:
        - ids: integer sequence or array of shape (N,), each in [0, vocab_size).

        Returns:
        - text: str of length N.
        """
        ids = _check_ids(ids, self.vocab_size)
        return "".join(VOCAB[i] for i in ids.tolist())

    def problem(self, text):
        """Why text cannot be encoded (its characters outside VOCAB), or None."""
        return out_of_vocab_report(text)

    def token_lengths(self):
        """(V,) int64: the characters each token stands for, all 1."""
        return np.ones(self.vocab_size, dtype=np.int64)

    def describe(self):
        """The JSON a checkpoint's metadata stores under "tokenizer"."""
        return dict(CHAR_DESCRIPTION)

    def save(self, run_dir):
        """Nothing to write: the description alone rebuilds the character tokenizer."""


def _tokenizers_library():
    """The `tokenizers` package, imported only when a BPE tokenizer is read."""
    try:
        import tokenizers
    except ImportError:
        raise ValueError(f"tokenizer: a BPE tokenizer.json needs the tokenizers package; install it with "
                         f"{INSTALL_HINT}") from None
    return tokenizers


class BPETokenizer:
    """A byte-pair encoding: the `tokenizers` library's Tokenizer, read from the bytes of a tokenizer.json.

    Inputs:
    - data: bytes of a Hugging Face tokenizer.json (the file `Tokenizer.save` writes)
    - where: how errors name the file the bytes came from

    The SHA-256 of data identifies the tokenizer in a run's metadata. Ids are
    decoded with every token kept (special tokens included), so decode(encode(s))
    is s whenever the tokenizer's normalizer leaves s unchanged (a byte-level
    BPE, as GPT-2's, always does).
    """

    kind = "bpe"

    def __init__(self, data, where=TOKENIZER_FILE):
        tokenizers = _tokenizers_library()
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # bad UTF-8, or the library's own error for JSON it cannot read
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"tokenizer: {where} is not a tokenizers tokenizer.json ({reason})") from e
        self.data, self.sha256 = data, hashlib.sha256(data).hexdigest()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        unk = getattr(self._tokenizer.model, "unk_token", None)
        self._unk_id = self._tokenizer.token_to_id(unk) if unk else None
        self._lengths = None

    @classmethod
    def from_file(cls, path, option="--tokenizer"):
        """Read a tokenizer.json; ValueError naming option when it is missing or not one."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"{option}: cannot read {str(path)!r} ({e.strerror or type(e).__name__}); expected "
                             f"a tokenizer.json") from e
        try:
            return cls(data, where=repr(str(path)))
        except ValueError as e:
            raise ValueError(f"{option}: {str(e).removeprefix('tokenizer: ')}") from e

    def encode(self, text):
        """
        Inputs:
        - text: str

        Returns:
        - ids: int64 array of shape (N,), N the number of tokens (not of characters).
        """
        if not isinstance(text, str):
            raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
        return np.array(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids):
        """
        Inputs:
        - ids: integer sequence or array of shape (N,), each in [0, vocab_size).

        Returns:
        - text: str
        """
        ids = _check_ids(ids, self.vocab_size)
        return self._tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def problem(self, text):
        """Why text cannot be encoded (a character the tokenizer maps to its unknown token), or None."""
        if self._unk_id is None:
            return None
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        unknown = [text[s:e] for i, (s, e) in zip(encoding.ids, encoding.offsets) if i == self._unk_id]
        if not unknown:
            return None
        return f"{len(unknown)} piece(s) the tokenizer cannot encode (its unknown token), e.g. {unknown[0]!r}"

    def token_lengths(self):
        """(V,) int64: the characters of each token's text, decoded alone.

        Their sum over a token stream is the length of its text whenever its
        tokens decode one by one (every token of ASCII text does).
        """
        if self._lengths is None:
            decode = self._tokenizer.decode
            self._lengths = np.array([len(decode([i], skip_special_tokens=False)) for i in range(self.vocab_size)],
                                     dtype=np.int64)
        return self._lengths

    def describe(self):
        """The JSON a checkpoint's metadata stores under "tokenizer"."""
        return {"kind": self.kind, "file": TOKENIZER_FILE, "sha256": self.sha256, "vocab_size": self.vocab_size}

    def save(self, run_dir):
        """Write run_dir/tokenizer.json (atomically); a different tokenizer.json already there is refused."""
        path = os.path.join(run_dir, TOKENIZER_FILE)
        if os.path.exists(path):
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() == self.sha256:
                    return
            raise ValueError(f"tokenizer: {path!r} holds another tokenizer; give another output folder")
        with atomic_open(path) as f:
            f.write(self.data)


def make_tokenizer(path=None, option="--tokenizer"):
    """The tokenizer a new run is made with: the character one (path None), or the BPE tokenizer.json at path."""
    return CharTokenizer() if path is None else BPETokenizer.from_file(path, option)


def tokenizer_from_meta(meta, run_dir):
    """The tokenizer a checkpoint's ids were made by.

    Inputs:
    - meta: the checkpoint's metadata; no "tokenizer" entry means the character
      tokenizer (checkpoints written before tokenizers were recorded)
    - run_dir: the folder holding the checkpoint (and a BPE run's tokenizer.json)

    Raises ValueError (starting "checkpoint: ") when the recorded tokenizer is
    unknown, or its file is missing or is not the one recorded (SHA-256).
    """
    description = meta.get("tokenizer", CHAR_DESCRIPTION)
    kind = description.get("kind") if isinstance(description, dict) else None
    if kind == CharTokenizer.kind:
        return CharTokenizer()
    if kind != BPETokenizer.kind:
        raise ValueError(f"checkpoint: its tokenizer {description!r} is not one minilora knows; expected kind "
                         f"'char' or 'bpe'")
    path = os.path.join(run_dir, description.get("file", TOKENIZER_FILE))
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: it was trained with a BPE tokenizer, but {path!r} is missing; copy the "
                         f"run's tokenizer.json there")
    tokenizer = BPETokenizer.from_file(path, option="checkpoint")
    if tokenizer.sha256 != description.get("sha256"):
        raise ValueError(f"checkpoint: {path!r} is not the tokenizer it was trained with (sha256 "
                         f"{tokenizer.sha256[:12]}, recorded {str(description.get('sha256'))[:12]})")
    return tokenizer


def check_vocab_size(tokenizer, vocab_size, what="checkpoint"):
    """ValueError unless the tokenizer has exactly vocab_size tokens (the rows of wte)."""
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{what}: the tokenizer ({tokenizer.kind}) has {tokenizer.vocab_size} tokens but the "
                         f"weights have vocab_size {vocab_size} (rows of wte); a model and its tokenizer must agree")


def single_token_id(tokenizer, text, what):
    """The one id text encodes to; ValueError naming what when it is not exactly one token."""
    ids = tokenizer.encode(text) if tokenizer.problem(text) is None else []
    if len(ids) != 1:
        raise ValueError(f"{what}: expected text that the run's tokenizer ({tokenizer.kind}) encodes to exactly "
                         f"one token, got {text!r} ({len(ids)} tokens)")
    return int(ids[0])
