"""Tokenizers: train a byte-level BPE or unigram vocabulary, or load any Hugging Face tokenizer.

Our vocabularies start with fixed special tokens, so their ids are the same in every moelab tokenizer:
  0 <pad>   1 <eos>   2 <bos>   3 <unk>   4 [S2S]   5 [NLU]   6 [NLG]   7.. <extra_id_0>..<extra_id_99>
The mode tokens and sentinels are what the UL2 objective (OpenMoE's pre-training mixture) inserts.
Text is encoded with special tokens treated as plain text: a corpus containing the string "<eos>"
must not end a document; only code inserts special ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Iterable

from moelab.config import MoelabError

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
MODE_TOKENS = ("[S2S]", "[NLU]", "[NLG]")
SENTINELS = tuple(f"<extra_id_{i}>" for i in range(100))
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, *MODE_TOKENS, *SENTINELS)
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials plus one token per byte
# The tokenizers trainer allocates vocab-sized tables up front (2**28 aborts the process on an out-of-memory
# panic); real tokenizers stay under 300k tokens, and 2**20 ids still fit the corpus's uint32 token array.
MAX_VOCAB_SIZE = 1 << 20
KINDS = ("bpe", "unigram")
# Names other tokenizer families give the same roles, tried in order.
_EOS_NAMES = (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>")
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>")


class Tokenizer:
    """One interface over a `tokenizers.Tokenizer` (ours) and a `transformers` tokenizer."""

    def __init__(self, backend, *, source: str = ""):
        self.backend = backend
        self.source = source  # the path or hub name it was loaded from, for corpus.json
        self.is_hf = not _is_fast_backend(backend)
        if not self.is_hf:
            backend.encode_special_tokens = True
        vocab = backend.get_vocab()
        self.vocab_size = len(backend) if self.is_hf else backend.get_vocab_size()
        eos = _first_id(vocab, _EOS_NAMES, getattr(backend, "eos_token_id", None))
        if eos is None:
            raise MoelabError(f"tokenizer {source or '(unnamed)'} has no end-of-sequence token "
                              f"(looked for {', '.join(_EOS_NAMES)})")
        self.eos_id: int = eos
        self.bos_id: int | None = _first_id(vocab, _BOS_NAMES, getattr(backend, "bos_token_id", None))
        pad = _first_id(vocab, (PAD,), getattr(backend, "pad_token_id", None))
        self.pad_id: int = eos if pad is None else pad  # padding is masked out, so EOS serves
        # Sentinels are used in order, so only an unbroken run from <extra_id_0> counts.
        ids = []
        for name in SENTINELS:
            if name not in vocab:
                break
            ids.append(vocab[name])
        self.sentinel_ids: tuple[int, ...] = tuple(ids)
        self.mode_ids: dict[str, int] = {m: vocab[m] for m in MODE_TOKENS if m in vocab}

    @property
    def kind(self) -> str:
        """The model family: bpe or unigram (tokenizers-library models), hf (a transformers tokenizer)."""
        if self.is_hf:
            return "hf"
        return type(self.backend.model).__name__.lower()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.is_hf:
            out = self.backend(list(texts), add_special_tokens=False, split_special_tokens=True)
            return [list(ids) for ids in out["input_ids"]]
        return [enc.ids for enc in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.is_hf:
            return self.backend.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self.backend.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> str:
        """A hash of the vocabulary and model, to check two corpora share one tokenizer."""
        if self.is_hf:
            data = json.dumps(sorted(self.backend.get_vocab().items())).encode()
        else:
            data = self.backend.to_str().encode()
        return hashlib.sha256(data).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write to `path`: a tokenizer.json file (ours) or a folder (transformers'); atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.is_hf:
            tmp = path.with_name(f".{path.name}.partial")
            self.backend.save_pretrained(str(tmp))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            return path
        if path.is_dir():
            path = path / "tokenizer.json"
        tmp = path.with_name(f".{path.name}.partial")
        self.backend.save(str(tmp))
        os.replace(tmp, path)
        return path


def _is_fast_backend(backend) -> bool:
    import tokenizers

    return isinstance(backend, tokenizers.Tokenizer)


def _first_id(vocab: dict[str, int], names: tuple[str, ...], fallback: int | None) -> int | None:
    for name in names:
        if name in vocab:
            return vocab[name]
    return fallback


# ---- training --------------------------------------------------------------------------------
def vocab_bound_problem(vocab_size: int) -> str | None:
    """What is wrong with a vocabulary beyond MAX_VOCAB_SIZE (the trainer would allocate its tables first and
    abort), as the tail of a message naming it; None when within the bound."""
    if vocab_size <= MAX_VOCAB_SIZE:
        return None
    return (f"{vocab_size} is too large: moelab trains tokenizers of at most {MAX_VOCAB_SIZE:,} tokens (the "
            "trainer allocates vocab-sized tables up front)")


def train_tokenizer(texts: Iterable[str], vocab_size: int, kind: str = "bpe",
                    out_path: str | Path | None = None) -> Tokenizer:
    """Train a byte-level tokenizer (any UTF-8 text round-trips, nothing maps to <unk>)."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if kind not in KINDS:
        raise MoelabError(f"unknown tokenizer kind {kind!r} (known: {', '.join(KINDS)})")
    if vocab_size < MIN_VOCAB_SIZE:
        raise MoelabError(f"vocab_size {vocab_size} is too small: the special tokens and 256 bytes "
                          f"need at least {MIN_VOCAB_SIZE}")
    too_large = vocab_bound_problem(vocab_size)
    if too_large:
        raise MoelabError(f"vocab_size {too_large}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "bpe":
        backend = FastTokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=alphabet, show_progress=False)
    else:
        backend = FastTokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                          unk_token=UNK, initial_alphabet=alphabet, show_progress=False)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainer)
    tok = Tokenizer(backend, source=str(out_path or ""))
    if out_path is not None:
        tok.save(out_path)
    return tok


# ---- loading ---------------------------------------------------------------------------------
def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """A tokenizer.json file, a folder (ours or a transformers save), or a Hugging Face hub name."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return _load_json(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            return _load_json(path / "tokenizer.json")
        return _load_hf(str(path), local=True)
    name = str(path_or_name)
    if name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1:
        raise MoelabError(f"tokenizer not found: {name}")
    return _load_hf(name, local=False)


def _load_json(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as FastTokenizer

    try:
        backend = FastTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise MoelabError(f"{path} is not a tokenizer.json file: {str(e).splitlines()[0]}") from None
    return Tokenizer(backend, source=str(path))


def _load_hf(name: str, *, local: bool) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MoelabError(f"loading tokenizer {name} needs transformers (pip install moelab[hf])") from None
    try:
        return Tokenizer(AutoTokenizer.from_pretrained(name, local_files_only=True), source=name)
    except MoelabError:
        raise
    except Exception as e:
        if local:
            raise MoelabError(f"{name} holds no tokenizer transformers can load: {_first_line(e)}") from None
    # Not cached: ask the hub, after a quick reachability check, because transformers retries for
    # about a minute before it gives up when there is no network.
    if not _hub_reachable():
        raise MoelabError(f"tokenizer {name!r} is not cached and huggingface.co cannot be reached (offline?)")
    try:
        return Tokenizer(AutoTokenizer.from_pretrained(name), source=name)
    except Exception as e:
        raise MoelabError(f"could not load tokenizer {name!r} from the Hugging Face hub: "
                          f"{_first_line(e)}") from None


def _hub_reachable(timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen("https://huggingface.co/api/models?limit=1", timeout=timeout).close()
        return True
    except Exception:
        return False


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_vocab_fits(tokenizer: Tokenizer | int, model_vocab_size: int) -> None:
    """Raise unless every token id the tokenizer can produce has a row in the model's embedding."""
    size = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size
    if size > model_vocab_size:
        raise MoelabError(f"the tokenizer has {size} tokens but the model's vocab_size is {model_vocab_size}: "
                          f"raise model.vocab_size to at least {size} or use a smaller tokenizer")
