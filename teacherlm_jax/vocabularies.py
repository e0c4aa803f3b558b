"""seqio vocabularies: Hugging Face `tokenizer.json` and ByT5 bytes."""

import dataclasses
import hashlib
import itertools
import json
import posixpath
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
TOKENIZER_CONFIG = "tokenizer_config.json"

_LOAD_LOCK = threading.Lock()


def _as_text(s: Union[str, bytes]) -> str:
  """`s` as str; invalid UTF-8 bytes become U+FFFD."""
  return s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s


def _read_bytes(path: str) -> bytes:
  """Reads `path` through tf.io.gfile (local, gs://, ...)."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except tf.errors.NotFoundError as e:
    raise FileNotFoundError(f"tokenizer file not found: {path}") from e


def _parse_tokenizer(path: str, raw: bytes) -> tokenizers.Tokenizer:
  """Builds a Tokenizer from tokenizer.json bytes; ValueError if invalid."""
  try:
    tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
  except Exception as e:  # tokenizers raises a bare Exception on bad input.
    raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
  # Treat "</s>" etc. occurring in raw text as text, like SentencePiece does.
  tokenizer.encode_special_tokens = True
  return tokenizer


def _read_tokenizer_config(tokenizer_path: str) -> dict:
  """`tokenizer_config.json` beside the tokenizer file ({} if there is none)."""
  path = posixpath.join(posixpath.dirname(tokenizer_path), TOKENIZER_CONFIG)
  if not tf.io.gfile.exists(path):
    return {}
  try:
    config = json.loads(_read_bytes(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from e
  return {key: _token_content(value) for key, value in config.items()}


def _token_content(value: Any) -> Any:
  """A tokenizer_config token entry: a string, or (older files) {"content": ...}."""
  return value["content"] if isinstance(value, dict) and "content" in value else value


def _template_bos(tokenizer_json: dict) -> Optional[str]:
  """The special token a `TemplateProcessing` post-processor puts before a single sequence (Llama 3's
  "<|begin_of_text|> $A"), or None."""
  processor = tokenizer_json.get("post_processor") or {}
  processors = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
  for step in processors:
    if step.get("type") == "TemplateProcessing" and step.get("single"):
      first = step["single"][0]
      if "SpecialToken" in first:
        return first["SpecialToken"]["id"]
  return None


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """What a tokenizer's files say about BOS and EOS: the tokens and whether encoding a prompt prepends BOS."""

  bos: Optional[str]
  eos: str
  add_bos: bool


def special_tokens(path: str, raw: bytes, tokenizer: tokenizers.Tokenizer) -> SpecialTokens:
  """BOS / EOS of a tokenizer, as Hugging Face reads its files.

  EOS and BOS: `eos_token` / `bos_token` of tokenizer_config.json beside it (Llama 3: <|end_of_text|>,
  <|begin_of_text|>; Qwen2: <|endoftext|> and no BOS), else "</s>" / "<s>". BOS is prepended when tokenizer.json's
  post-processor is a template starting with a special token (what `transformers` applies: Llama 3, Mistral, OPT),
  else when tokenizer_config.json says `add_bos_token: true`, else not (BLOOM, Qwen2).
  """
  config = _read_tokenizer_config(path)
  eos = config.get("eos_token") or EOS_TOKEN
  if tokenizer.token_to_id(eos) is None:
    raise ValueError(f"{path} has no EOS token {eos!r}: set eos_token in the {TOKENIZER_CONFIG} beside it")
  bos = config["bos_token"] if "bos_token" in config else BOS_TOKEN
  template = _template_bos(json.loads(raw.decode("utf-8")))
  if template is not None:
    return SpecialTokens(template, eos, True)
  bos = bos if bos is not None and tokenizer.token_to_id(bos) is not None else None
  return SpecialTokens(bos, eos, bool(config.get("add_bos_token")) and bos is not None)


def _num_elements(s: tf.Tensor, start: int,
                  stop: int) -> Union[int, tf.Tensor]:
  """Size of s.shape[start:stop]: a static int if known, else int64 scalar."""
  static = s.shape[start:stop].num_elements()
  if static is not None:
    return static
  return tf.reduce_prod(tf.shape(s, out_type=tf.int64)[start:stop])


class HfTokenizerVocabulary(seqio.Vocabulary):
  """seqio Vocabulary backed by a Hugging Face `tokenizer.json` (e.g. BLOOM's).

  Ids are the tokenizer's own ids: for BLOOM `<unk>`=0, `<s>`=1, `</s>`=2,
  `<pad>`=3. `extra_ids` reserves unnamed ids [base, base + extra_ids) that are
  never produced by encoding and are dropped when decoding. BOS and EOS are the
  ones the tokenizer's files name (`special_tokens`), and `add_bos` says whether
  the family prepends BOS to a prompt (OPT, Llama 3, Mistral: yes; BLOOM,
  Qwen2: no); `encode_prompt` does, and training's feature converter starts
  every example with it (`bos_to_prepend`).

  Padding: `pad_id` is seqio's `PAD_ID` = 0, not the tokenizer's `<pad>` id
  (exposed as `tokenizer_pad_id`): seqio's `trim_and_pad_dataset` pads with 0.
  Id 0 may be an ordinary token (Llama 3 and Qwen2's "!"): our feature
  converter takes loss weights and packed segments from each token's role,
  not from its id, and decoding and scoring carry explicit masks.

  Encoding adds no special tokens (seqio's `append_eos` adds EOS) and treats
  special-token strings in the text as plain text. Decoding stops at the first
  EOS, drops ids outside [0, base vocab size) and skips special tokens, so
  `decode(encode(s)) == s` for any str `s` with a byte-level BPE tokenizer.

  The file is read with `tf.io.gfile` (so `gs://` works) on first use; copies
  and pickles carry only the path. A missing file raises FileNotFoundError, an
  invalid one ValueError, both on first use (or on `load()`).
  """

  def __init__(self, tokenizer_path: str, extra_ids: int = 0):
    """Args: tokenizer_path: path to tokenizer.json; extra_ids: sentinels."""
    self._tokenizer_path = tokenizer_path
    self._tokenizer: Optional[tokenizers.Tokenizer] = None
    self._sha256: Optional[str] = None
    self._special: Optional[SpecialTokens] = None
    super().__init__(extra_ids=extra_ids)

  def __getstate__(self) -> Dict[str, Any]:
    state = self.__dict__.copy()
    state["_tokenizer"] = None
    state["_sha256"] = None
    state["_special"] = None
    return state

  def __setstate__(self, state: Dict[str, Any]) -> None:
    self.__dict__.update(state)

  def load(self) -> None:
    """Reads and parses the tokenizer file now instead of on first use."""
    if self._tokenizer is not None:
      return
    with _LOAD_LOCK:
      if self._tokenizer is None:
        raw = _read_bytes(self._tokenizer_path)
        tokenizer = _parse_tokenizer(self._tokenizer_path, raw)
        self._special = special_tokens(self._tokenizer_path, raw, tokenizer)
        self._sha256 = hashlib.sha256(raw).hexdigest()
        self._tokenizer = tokenizer

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer` (loaded lazily)."""
    self.load()
    return self._tokenizer

  @property
  def tokenizer_path(self) -> str:
    return self._tokenizer_path

  @property
  def sha256(self) -> str:
    """Hex SHA-256 of the tokenizer.json bytes."""
    self.load()
    return self._sha256

  @property
  def special(self) -> SpecialTokens:
    self.load()
    return self._special

  @property
  def bos_id(self) -> Optional[int]:
    return None if self.special.bos is None else self.tokenizer.token_to_id(self.special.bos)

  @property
  def eos_id(self) -> Optional[int]:
    return self.tokenizer.token_to_id(self.special.eos)

  @property
  def add_bos(self) -> bool:
    """Whether a prompt starts with BOS for this tokenizer's family (see `special_tokens`)."""
    return self.special.add_bos

  @property
  def unk_id(self) -> Optional[int]:
    return self.tokenizer.token_to_id(UNK_TOKEN)

  @property
  def pad_id(self) -> int:
    """seqio's PAD_ID (0); see the class docstring."""
    return seqio.vocabularies.PAD_ID

  @property
  def tokenizer_pad_id(self) -> Optional[int]:
    """Id of the tokenizer's own `<pad>` token (3 for BLOOM), if any."""
    return self.tokenizer.token_to_id(PAD_TOKEN)

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: Union[str, bytes]) -> List[int]:
    """str -> [num_tokens] ids, no special tokens added."""
    return self._encode_batch([_as_text(s)])[0]

  def _encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
    encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings]

  def _clean(self, ids: Sequence[int]) -> List[int]:
    """Truncates before the first EOS and drops ids outside [0, base size)."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    size = self._base_vocab_size
    return [i for i in ids if 0 <= i < size]

  def _decode_batch(self, batch: Sequence[Sequence[int]]) -> List[str]:
    cleaned = [self._clean(ids) for ids in batch]
    return self.tokenizer.decode_batch(cleaned, skip_special_tokens=True)

  def _decode(self, ids: Sequence[int]) -> str:
    """[num_tokens] ids -> str, through the first EOS."""
    return self._decode_batch([ids])[0]

  def _encode_np(self, strings: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """[n] bytes -> (flat int32 ids [sum(lengths)], int64 lengths [n])."""
    ids = self._encode_batch([_as_text(s) for s in strings.reshape(-1)])
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                         count=int(lengths.sum()))
    return values, lengths

  def _decode_np(self, rows: np.ndarray) -> np.ndarray:
    """[n, length] ids -> [n] UTF-8 bytes (object array)."""
    texts = self._decode_batch(rows.tolist())
    return np.array([t.encode("utf-8") for t in texts], dtype=object)

  def _encode_tf(self, s: tf.Tensor) -> Union[tf.Tensor, tf.RaggedTensor]:
    """tf.string [] -> int32 [n]; [d0, .., dk] -> ragged [d0, .., dk, None]."""
    s = tf.convert_to_tensor(s, dtype=tf.string)
    rank = s.shape.rank
    if rank is None:
      raise ValueError("encode_tf needs a string tensor of known rank")
    values, lengths = tf.numpy_function(
        self._encode_np, [tf.reshape(s, [-1])], [tf.int32, tf.int64],
        stateful=False)
    values.set_shape([None])
    if rank == 0:
      return values
    lengths.set_shape([s.shape.num_elements()])
    ids = tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)
    for dim in reversed(range(1, rank)):
      ids = tf.RaggedTensor.from_uniform_row_length(
          ids, _num_elements(s, dim, dim + 1), nrows=_num_elements(s, 0, dim))
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int ids [..., length] -> tf.string [...] (dense ids, rank >= 1)."""
    ids = tf.convert_to_tensor(ids)
    if ids.shape.rank is None or ids.shape.rank == 0:
      raise ValueError(f"decode_tf needs ids of known rank >= 1, got {ids}")
    shape = tf.shape(ids)
    rows = tf.reshape(ids, [tf.reduce_prod(shape[:-1]), shape[-1]])
    texts = tf.numpy_function(self._decode_np, [rows], tf.string,
                              stateful=False)
    texts = tf.reshape(texts, shape[:-1])
    texts.set_shape(ids.shape[:-1])
    return texts

  def __eq__(self, other: Any) -> bool:
    """Equal if same extra_ids and same file (by path or by content)."""
    if not isinstance(other, HfTokenizerVocabulary):
      return False
    if self.extra_ids != other.extra_ids:
      return False
    return (self._tokenizer_path == other._tokenizer_path
            or self.sha256 == other.sha256)

  def __hash__(self) -> int:
    return hash((type(self).__name__, self.extra_ids, self.sha256))

  def __str__(self) -> str:
    return (f"HfTokenizerVocabulary(file={self._tokenizer_path}, "
            f"extra_ids={self.extra_ids})")

  __repr__ = __str__


def bos_to_prepend(vocabulary: seqio.Vocabulary) -> Optional[int]:
  """The BOS id a prompt (and a training example) starts with for this vocabulary's family, or None."""
  vocabulary = getattr(vocabulary, "resolved", vocabulary)  # tasks.registration.ConfiguredVocabulary
  return vocabulary.bos_id if getattr(vocabulary, "add_bos", False) else None


def encode_prompt(vocabulary: seqio.Vocabulary, text: str, max_length: Optional[int] = None) -> List[int]:
  """Token ids of a prompt or context as the model's family reads it: BOS first where the tokenizer prepends one,
  then the text's tokens (see `keep_last` for `max_length`)."""
  bos = bos_to_prepend(vocabulary)
  ids = ([] if bos is None else [bos]) + list(vocabulary.encode(text))
  return ids if max_length is None else keep_last(vocabulary, ids, max_length)


def keep_last(vocabulary: seqio.Vocabulary, ids: Sequence[int], max_length: int) -> List[int]:
  """`encode_prompt` ids cut to `max_length`: the last tokens, after the BOS the family prepends (kept)."""
  prefix = 1 if bos_to_prepend(vocabulary) is not None and ids else 0
  keep, rest = max(max_length - prefix, 0), list(ids[prefix:])
  return list(ids[:prefix]) + (rest[-keep:] if keep else [])


def byte_vocabulary() -> seqio.ByteVocabulary:
  """ByT5 byte vocabulary for tiny configs: 0=PAD, 1=EOS, 2=UNK, byte b -> b+3.

  Vocab size 259, no training or files needed.
  """
  return seqio.ByteVocabulary()
