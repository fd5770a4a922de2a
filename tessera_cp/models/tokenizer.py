"""Tokenizers for a model folder: Hugging Face's ``tokenizers`` package when the folder has ``tokenizer.json``, else a
byte-level fallback (ids 0..255 are the bytes of the UTF-8 text; the config's bos/eos ids mark the ends), which is
what the random tiny checkpoint of ``tiny.py`` uses. ``StreamDecoder`` turns generated ids into text piece by piece
(``flush`` at the end).
"""
import json
import warnings
from pathlib import Path

from ..errors import TesseraError

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "StreamDecoder"]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; ``bos_id`` is put in front when ``add_bos``; ids >= 256 decode to nothing."""

    def __init__(self, bos_id=None, eos_id=None, vocab_size=256):
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, int(vocab_size)
        if self.vocab_size < 256:
            raise TesseraError(f"ByteTokenizer needs a vocabulary of at least 256 ids, the model has {vocab_size}")

    def encode(self, text, add_bos=True):
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids):
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from tokenizer.json (its post-processor adds bos where the model wants it)."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text, add_bos=True):
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(folder, config=None):
    """The tokenizer of a model folder (see the module docstring)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        try:
            return HFTokenizer(folder / "tokenizer.json")
        except ImportError:
            warnings.warn(f"{folder} has tokenizer.json but the `tokenizers` package is not installed "
                          "(pip install tokenizers); falling back to byte-level ids", RuntimeWarning, stacklevel=2)
    bos = eos = None
    vocab = 256
    if config is not None:
        bos, vocab = config.bos_token_id, config.vocab_size
        eos = (config.stop_token_ids or [None])[0]
    elif (folder / "config.json").is_file():
        with open(folder / "config.json") as f:
            c = json.load(f)
        bos, eos, vocab = c.get("bos_token_id"), c.get("eos_token_id"), c.get("vocab_size", 256)
        eos = eos[0] if isinstance(eos, list) else eos
    return ByteTokenizer(bos, eos, vocab)


class StreamDecoder:
    """Text of generated ids as it grows: ``push(id)`` returns the new complete characters (held back while the
    text ends in an incomplete UTF-8 sequence, which decodes to U+FFFD). Decodes the ids since the last line
    break, so that tokenizers whose pieces depend on their neighbours (leading spaces) come out right."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids, self._printed = [], ""

    def push(self, token_id):
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self._printed):]
        if text.endswith("\n"):
            self._ids, self._printed = [], ""
        else:
            self._printed = text
        return new

    def flush(self):
        """Whatever is held back (an incomplete character decodes to U+FFFD), at the end of a generation."""
        text = self.tokenizer.decode(self._ids)[len(self._printed):]
        self._ids, self._printed = [], ""
        return text
