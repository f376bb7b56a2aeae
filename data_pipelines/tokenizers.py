"""Text tokenizers behind one small protocol.

The instruction pipeline tokenises every chunk of a conversation separately and adds BOS/EOS itself
(as the official mPLUG-Owl code does with `tokenizer(chunk, add_special_tokens=False)`), so all it needs
from a tokenizer is `encode` without special tokens plus the special ids. Three implementations:

- `SentencePieceTokenizer`: a LLaMA(-2) `tokenizer.model`. Raw SentencePiece encoding equals the slow
  HF `LlamaTokenizer` of transformers 4.28 (the official code's) for text without literal special-token
  strings.
- `HFJsonTokenizer`: a Hugging Face `tokenizer.json` (LLaMA-3 style BPE) via the `tokenizers` package,
  with BOS/EOS/PAD read from `tokenizer_config.json` / `special_tokens_map.json` next to it.
- `ToyWordTokenizer`: the hash-based word tokenizer that produced the golden `pipeline_cases.npz`.

`load_tokenizer(path)` picks one from the path.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Optional, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens are rendered, not skipped)."""


class ToyWordTokenizer:
    """The golden files' toy tokenizer (meta.json `toy_tokenizer`):
    pieces = `re.findall(r'\\w+|[^\\w\\s]|\\n', text)`, id = 3 + crc32(piece) % (vocab_size - 3);
    pad/unk 0, bos 1, eos 2. Spaces vanish and ids collide, so `decode` is best effort: it joins the
    pieces seen by this instance with spaces and writes unseen ids as `<id>`."""

    _PIECE = re.compile(r"\w+|[^\w\s]|\n")

    def __init__(self, vocab_size: int = 512):
        if vocab_size <= 3:
            raise ValueError(f"vocab_size must exceed the 3 special ids, got {vocab_size}")
        self.vocab_size = vocab_size
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._seen: dict[int, str] = {}

    def piece_id(self, piece: str) -> int:
        return 3 + zlib.crc32(piece.encode("utf-8")) % (self.vocab_size - 3)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self._PIECE.findall(text):
            i = self.piece_id(piece)
            self._seen.setdefault(i, piece)
            ids.append(i)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        names = {0: "<pad>", 1: "<s>", 2: "</s>"}
        return " ".join(names.get(i) or self._seen.get(i, f"<{i}>") for i in ids)


class SentencePieceTokenizer:
    """A SentencePiece model file (LLaMA / LLaMA-2 `tokenizer.model`).

    LLaMA's model has no pad piece (`pad_id() == -1`); the official pipeline pads with id 0 (`<unk>`),
    which is the default `pad_id` here. Padded positions never carry loss, so any valid id works.
    """

    def __init__(self, path: str | Path, *, pad_id: Optional[int] = None):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a SentencePiece model: {e}") from None
        self.vocab_size = self._sp.get_piece_size()
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        if eos < 0:
            raise ValueError(f"SentencePiece model {path} has no EOS piece")
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos
        self.pad_id = pad_id if pad_id is not None else (pad if pad >= 0 else 0)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _special_token(value) -> Optional[str]:
    """A special token entry of tokenizer_config.json: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFJsonTokenizer:
    """A Hugging Face fast-tokenizer file (`tokenizer.json`), e.g. LLaMA-3's.

    BOS/EOS/PAD come from the `bos_token`/`eos_token`/`pad_token` arguments, else from
    `tokenizer_config.json`, else `special_tokens_map.json` in the same folder. Without a PAD token the
    pad id is the EOS id (LLaMA-3 defines none); without a BOS token no BOS is added.
    """

    def __init__(self, path: str | Path, *, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 pad_token: Optional[str] = None):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        self.path = path
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
        found: dict[str, Optional[str]] = {"bos_token": None, "eos_token": None, "pad_token": None}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            side = path.parent / name
            if side.is_file():
                data = json.loads(side.read_text())
                for key in found:
                    token = _special_token(data.get(key))
                    if token is not None:
                        found[key] = token
        for key, given in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if given is not None:
                found[key] = given
        self.bos_id = self._token_id(found["bos_token"])
        self.eos_id = self._token_id(found["eos_token"])
        if self.eos_id is None:
            raise ValueError(f"no EOS token for {path}: pass eos_token= or add tokenizer_config.json")
        pad = self._token_id(found["pad_token"])
        self.pad_id = pad if pad is not None else self.eos_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token: Optional[str]) -> Optional[int]:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary of {self.path}")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path, **kwargs) -> Tokenizer:
    """A tokenizer from `path`: a `*.model` SentencePiece file, a `*.json` tokenizer file, a folder holding
    `tokenizer.json` (preferred) or `tokenizer.model`, or `toy:VOCAB` for the golden toy tokenizer.
    Keyword arguments go to the implementation's constructor.
    Raises FileNotFoundError for a missing path, ValueError for an unknown or unreadable file."""
    spec = str(path)
    if spec.startswith("toy:"):
        return ToyWordTokenizer(int(spec[4:]), **kwargs)
    path = Path(path)
    if path.is_dir():
        for name, cls in (("tokenizer.json", HFJsonTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).is_file():
                return cls(path / name, **kwargs)
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, **kwargs)
    if path.suffix == ".json":
        return HFJsonTokenizer(path, **kwargs)
    raise ValueError(f"unknown tokenizer file type {path.suffix!r} for {path} (expected .model or .json)")


class WordPieceTokenizer:
    """The Q-Former's BERT WordPiece tokenizer (InstructBLIP's `qformer_tokenizer`), for the batch's
    `qformer_tokens`: `encode` gives `[CLS] ... [SEP]` truncated to `max_len` ids, as LAVIS's
    `self.tokenizer(text_input, truncation=True, max_length=max_txt_len)` and transformers'
    `InstructBlipProcessor` tokenise the instruction. `path`: a `tokenizer.json` (its own normaliser and
    post-processor), a BERT `vocab.txt` (lower-cased, as `bert-base-uncased`), or a directory holding one
    (`tokenizer.json` preferred; also its `qformer_tokenizer/` sub-folder, as transformers saves it)."""

    def __init__(self, path: str | Path, max_len: int = 128):
        from tokenizers import Tokenizer as _Tok
        from tokenizers.implementations import BertWordPieceTokenizer
        path = Path(path)
        if path.is_dir():
            found = [path / sub / name for sub in ("", "qformer_tokenizer") for name in ("tokenizer.json", "vocab.txt")
                     if (path / sub / name).is_file()]
            if not found:
                raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path} (or its qformer_tokenizer/)")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"Q-Former tokenizer not found: {path}")
        if max_len < 2:
            raise ValueError(f"the Q-Former's text length must be at least 2 ([CLS] and [SEP]), got {max_len}")
        try:
            self._tok = _Tok.from_file(str(path)) if path.suffix == ".json" else BertWordPieceTokenizer(
                str(path), lowercase=True)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise ValueError(f"{path} is not a WordPiece tokenizer: {e}") from None
        self._tok.enable_truncation(max_len)
        self.path, self.max_len = path, max_len
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)
