"""Tests for teacherlm_jax.vocabularies (fixture tokenizer, no network)."""

import copy
import json
import pathlib
import pickle

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tokenizers
from tokenizers import processors

from teacherlm_jax import vocabularies
from teacherlm_jax.vocabularies import HfTokenizerVocabulary

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tokenizer"
TOKENIZER_JSON = str(FIXTURE / "tokenizer.json")

TEXTS = [
    "What kind of people will someone who is in charge of project look for?",
    "Have knowledge means information, understanding or skill that you get "
    "from experience or education.\nSomeone who is in charge of project look "
    "for people who have knowledge.",
    "Eating soup means eating only solids.",
    "Soup is mainly liquid sometimes with bits of food inside.",
    "  leading spaces, trailing tab\t and\r\nCRLF  ",
    "Crème brûlée in São Paulo, naïve façade, Ærøskøbing",
    "emoji 🤗🧑‍🚀 flags 🇫🇷 CJK 日本語 Ελληνικά русский العربية",
    "literal special strings: <s> </s> <pad> <unk>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def vocab() -> HfTokenizerVocabulary:
  return HfTokenizerVocabulary(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def raw() -> tokenizers.Tokenizer:
  return tokenizers.Tokenizer.from_file(TOKENIZER_JSON)


def test_sizes_and_special_ids(vocab):
  assert vocab.vocab_size == 512
  assert vocab._base_vocab_size == 512
  assert (vocab.unk_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2)
  assert vocab.pad_id == 0 == seqio.vocabularies.PAD_ID
  assert vocab.tokenizer_pad_id == 3
  assert HfTokenizerVocabulary(TOKENIZER_JSON, extra_ids=10).vocab_size == 522


def test_fixture_layout_matches_bloom(raw):
  config = json.loads(pathlib.Path(TOKENIZER_JSON).read_text("utf-8"))
  assert [(t["id"], t["content"], t["special"]) for t in config["added_tokens"]
         ] == [(0, "<unk>", True), (1, "<s>", True), (2, "</s>", True),
               (3, "<pad>", True)]
  assert config["normalizer"] is None
  assert config["pre_tokenizer"]["type"] == "ByteLevel"
  assert config["pre_tokenizer"]["add_prefix_space"] is False
  assert config["decoder"]["type"] == "ByteLevel"
  assert raw.get_vocab_size() == 512


def test_encode_exact_ids(vocab):
  assert vocab.encode("What kind of people will someone look for?") == [
      58, 323, 444, 459, 299, 418, 269, 426, 471, 374, 305, 329, 78, 337, 34]
  assert vocab.encode("héllo 🤗") == [
      75, 131, 106, 79, 79, 82, 224, 176, 257, 101, 249]
  assert vocab.encode("") == []


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(vocab, text):
  ids = vocab.encode(text)
  assert all(isinstance(i, int) and 0 <= i < 512 for i in ids)
  assert vocab.decode(ids) == text
  assert vocab.encode(text.encode("utf-8")) == ids


@pytest.mark.parametrize("text", [t for t in TEXTS if "<" not in t])
def test_encode_matches_tokenizers(vocab, raw, text):
  assert vocab.encode(text) == raw.encode(text, add_special_tokens=False).ids
  assert vocab.decode(vocab.encode(text)) == raw.decode(
      raw.encode(text).ids)


def test_encode_adds_no_special_tokens(vocab, tmp_path):
  special = {0, 1, 2, 3}
  for text in TEXTS:
    assert not special & set(vocab.encode(text)), text
  # Even a tokenizer.json whose post-processor wraps in <s> ... </s>.
  tokenizer = tokenizers.Tokenizer.from_file(TOKENIZER_JSON)
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
  tokenizer.save(str(tmp_path / "wrapped.json"))
  assert tokenizer.encode("Soup").ids[0] == 1
  assert tokenizer.encode("Soup").ids[-1] == 2
  wrapped = HfTokenizerVocabulary(str(tmp_path / "wrapped.json"))
  assert wrapped.encode("Soup") == vocab.encode("Soup")


def test_special_strings_in_text_are_text(vocab):
  ids = vocab.encode("a</s>b")
  assert 2 not in ids
  assert vocab.decode(ids) == "a</s>b"


def test_decode_stops_at_eos_and_drops_out_of_range(vocab):
  a, b = vocab.encode("Eating soup"), vocab.encode(" means solids.")
  assert vocab.decode(a + [2] + b) == "Eating soup"
  assert vocab.decode(a + [512, 100_000] + b) == "Eating soup means solids."
  assert vocab.decode([1] + a + [3, 0] + b + [2, 0, 0]) == (
      "Eating soup means solids.")
  assert vocab.decode([2] + a) == ""
  assert vocab.decode([-1] + a + [-7]) == "Eating soup"
  assert vocab._decode(a + [512, 2] + b) == "Eating soup"
  assert vocab.decode(np.array(a + [2] + b, np.int32)) == "Eating soup"
  assert vocab.decode(tf.constant(a + [2] + b)) == "Eating soup"
  sentinels = HfTokenizerVocabulary(TOKENIZER_JSON, extra_ids=4)
  assert sentinels.decode(a + [515] + b) == "Eating soup means solids."


def test_decode_matches_byte_vocabulary_semantics():
  """Same EOS / out-of-range rules as seqio.ByteVocabulary."""
  byte_vocab = vocabularies.byte_vocabulary()
  assert isinstance(byte_vocab, seqio.ByteVocabulary)
  assert byte_vocab.vocab_size == 259
  assert byte_vocab.encode("hi") == [107, 108]
  assert byte_vocab.decode([107, 1, 108]) == "h"
  assert byte_vocab.decode([107, 300, 108]) == "hi"


def _dataset_map(fn, dataset: tf.data.Dataset) -> list:
  mapped = dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)
  return list(mapped.as_numpy_iterator())


def test_encode_tf_in_dataset_map(vocab):
  dataset = tf.data.Dataset.from_tensor_slices(TEXTS)
  assert dataset.map(vocab.encode_tf).element_spec == tf.TensorSpec(
      [None], tf.int32)
  got = _dataset_map(vocab.encode_tf, dataset)
  assert [g.tolist() for g in got] == [vocab.encode(t) for t in TEXTS]


def test_encode_tf_parallel_map_many_examples(vocab):
  texts = [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(500)]
  dataset = tf.data.Dataset.from_tensor_slices(texts)
  got = _dataset_map(vocab.encode_tf, dataset)
  assert [g.tolist() for g in got] == [vocab.encode(t) for t in texts]


def test_encode_tf_batched(vocab):
  ragged = vocab.encode_tf(tf.constant(TEXTS))
  assert isinstance(ragged, tf.RaggedTensor)
  assert ragged.to_list() == [vocab.encode(t) for t in TEXTS]
  grid = tf.constant([TEXTS[:3], TEXTS[3:6]])
  assert vocab.encode_tf(grid).to_list() == [
      [vocab.encode(t) for t in TEXTS[:3]],
      [vocab.encode(t) for t in TEXTS[3:6]]]
  dataset = tf.data.Dataset.from_tensors(tf.constant(TEXTS))
  in_map = next(iter(dataset.map(vocab.encode_tf)))
  assert isinstance(in_map, tf.RaggedTensor)
  assert in_map.to_list() == [vocab.encode(t) for t in TEXTS]


def test_decode_tf_in_dataset_map(vocab):
  ids = [vocab.encode(t) for t in TEXTS]
  dataset = tf.data.Dataset.from_generator(
      lambda: ids, output_signature=tf.TensorSpec([None], tf.int32))
  assert dataset.map(vocab.decode_tf).element_spec == tf.TensorSpec(
      [], tf.string)
  got = [g.decode("utf-8") for g in _dataset_map(vocab.decode_tf, dataset)]
  assert got == TEXTS


def test_decode_tf_batched_matches_python(vocab):
  a, b = vocab.encode("Soup is liquid."), vocab.encode("naïve 🤗")
  rows = [a + [2] + b, b + [600, 0, 1, 3], [2] + a, b]
  width = max(map(len, rows))
  batch = tf.constant([r + [0] * (width - len(r)) for r in rows])
  got = vocab.decode_tf(batch)
  assert got.shape == [4]
  assert [g.decode("utf-8") for g in got.numpy()] == [
      vocab.decode(r) for r in rows]
  assert [vocab.decode(r) for r in rows] == [
      "Soup is liquid.", "naïve 🤗", "", "naïve 🤗"]
  grid = vocab.decode_tf(tf.reshape(batch, [2, 2, width]))
  assert grid.shape == [2, 2]
  assert grid.numpy().reshape(-1).tolist() == got.numpy().tolist()
  single = _dataset_map(vocab.decode_tf,
                        tf.data.Dataset.from_tensors(batch))[0]
  assert single.tolist() == got.numpy().tolist()


@pytest.mark.parametrize(
    "shape", [[], [3], [None], [2, 3], [None, 3], [2, None], [None, None]])
def test_graph_mode_static_shapes(vocab, shape):
  encode = tf.function(vocab.encode_tf,
                       input_signature=[tf.TensorSpec(shape, tf.string)])
  encoded = encode.get_concrete_function().structured_outputs
  assert encoded.shape.as_list() == shape + [None]
  assert encoded.dtype == tf.int32
  decode = tf.function(vocab.decode_tf,
                       input_signature=[tf.TensorSpec(shape + [5], tf.int32)])
  decoded = decode.get_concrete_function().structured_outputs
  assert decoded.shape.as_list() == shape
  assert decoded.dtype == tf.string


def test_seqio_task(vocab):
  name = "teacherlm_jax_test_hf_vocab_task"
  texts = TEXTS[:4]

  def dataset_fn(split: str, shuffle_files: bool, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"targets": texts})

  seqio.TaskRegistry.add(
      name,
      source=seqio.dataset_providers.FunctionDataSource(
          dataset_fn, splits=["train"]),
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos],
      output_features={"targets": seqio.Feature(
          vocabulary=HfTokenizerVocabulary(TOKENIZER_JSON), add_eos=True)})
  try:
    task = seqio.get_mixture_or_task(name)
    examples = list(task.get_dataset(
        None, split="train", shuffle=False).as_numpy_iterator())
    expected = [vocab.tokenizer.encode(t).ids + [2] for t in texts]
    assert [e["targets"].tolist() for e in examples] == expected
    assert examples[2]["targets"].tolist() == [
        40, 274, 268, 266, 286, 83, 469, 320, 274, 268, 324, 328, 266, 414,
        332, 86, 17, 2]
    assert [e["targets_pretokenized"].decode() for e in examples] == texts
    _check_padding(task, expected)
  finally:
    seqio.TaskRegistry.remove(name)
  assert name not in seqio.TaskRegistry.names()


def _check_padding(task: seqio.Task, expected: list) -> None:
  """seqio's feature converter pads with vocab.pad_id and masks the loss."""
  length = 128
  converted = list(seqio.DecoderFeatureConverter(pack=False)(
      task.get_dataset({"targets": length}, split="train", shuffle=False),
      {"targets": length}).as_numpy_iterator())
  assert len(converted) == len(expected)
  for example, ids in zip(converted, expected):
    pad = length - len(ids)
    assert pad > 0
    assert example["decoder_target_tokens"].tolist() == ids + [0] * pad
    weights = example["decoder_loss_weights"].tolist()
    assert weights == [1] * len(ids) + [0] * pad


def test_equality_and_pickling(vocab, tmp_path):
  same = HfTokenizerVocabulary(TOKENIZER_JSON)
  assert same == vocab and hash(same) == hash(vocab)
  copied = tmp_path / "tokenizer.json"
  copied.write_bytes(pathlib.Path(TOKENIZER_JSON).read_bytes())
  assert HfTokenizerVocabulary(str(copied)) == vocab
  assert HfTokenizerVocabulary(TOKENIZER_JSON, extra_ids=1) != vocab
  assert vocab != vocabularies.byte_vocabulary()
  config = json.loads(copied.read_text("utf-8"))
  config["model"]["vocab"]["Ġthe"], config["model"]["vocab"]["!"] = (
      config["model"]["vocab"]["!"], config["model"]["vocab"]["Ġthe"])
  other = tmp_path / "other.json"
  other.write_text(json.dumps(config), "utf-8")
  assert HfTokenizerVocabulary(str(other)) != vocab
  for clone in (pickle.loads(pickle.dumps(vocab)), copy.deepcopy(vocab)):
    assert clone._tokenizer is None
    assert clone == vocab
    assert clone.encode(TEXTS[1]) == vocab.encode(TEXTS[1])


def test_missing_file(tmp_path):
  path = str(tmp_path / "nope" / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="nope/tokenizer.json"):
    HfTokenizerVocabulary(path).encode("x")


@pytest.mark.parametrize("content", [
    b"this is not json", b"\xff\xfe\x00garbage", b"{}", b'{"model": 3}'])
def test_invalid_file(tmp_path, content):
  path = tmp_path / "bad.json"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="bad.json is not a valid tokenizer"):
    HfTokenizerVocabulary(str(path)).load()


@pytest.mark.parametrize("vocab_map,message", [
    ({"<unk>": 0, "a": 1}, "has no EOS token '</s>': set eos_token in the tokenizer_config.json beside it"),
])
def test_rejects_tokenizer_unusable_with_seqio(tmp_path, vocab_map, message):
  tokenizer = tokenizers.Tokenizer(
      tokenizers.models.WordLevel(vocab_map, unk_token="<unk>"))
  tokenizer.add_special_tokens([t for t in vocab_map if t.startswith("<")])
  path = tmp_path / "wordlevel.json"
  tokenizer.save(str(path))
  with pytest.raises(ValueError, match=message):
    HfTokenizerVocabulary(str(path)).load()


FAMILY_TOKENIZERS = ["opt", "llama", "qwen2", "mistral"]


@pytest.mark.parametrize("name", FAMILY_TOKENIZERS)
def test_family_tokenizers_prepend_bos_as_transformers_does(name):
  """OPT (</s>), Llama 3 (<|begin_of_text|>) and Mistral (<s>) prompts start with BOS, Qwen2's do not; ids, BOS and
  EOS equal what `transformers.AutoTokenizer` gave for the fixture (hf_<name>_tiny_tokens.json)."""
  expected = json.loads((FIXTURES / f"hf_{name}_tiny_tokens.json").read_text())
  vocabulary = HfTokenizerVocabulary(str(FIXTURES / f"hf_{name}_tiny" / "tokenizer.json"))
  assert vocabulary.add_bos == expected["add_bos"] == (name != "qwen2")
  assert vocabulary.eos_id == expected["eos_id"]
  if expected["add_bos"]:
    assert vocabulary.bos_id == expected["bos_id"]
  for case in expected["cases"]:
    assert vocabularies.encode_prompt(vocabulary, case["text"]) == case["input_ids"], case["text"]
    assert vocabulary.decode(vocabulary.encode(case["text"])) == case["text"]


def test_prompts_cut_to_length_keep_their_bos():
  vocabulary = HfTokenizerVocabulary(str(FIXTURES / "hf_llama_tiny" / "tokenizer.json"))
  ids = vocabularies.encode_prompt(vocabulary, "The quick brown fox jumps over the lazy dog.")
  cut = vocabularies.encode_prompt(vocabulary, "The quick brown fox jumps over the lazy dog.", max_length=5)
  assert cut == [vocabulary.bos_id] + ids[-4:] and len(ids) > 5
  assert vocabularies.bos_to_prepend(vocabularies.byte_vocabulary()) is None


def test_id_zero_may_be_an_ordinary_token():
  """Llama 3 and Qwen2 give id 0 to "!": it encodes and decodes as text (training takes padding from the roles)."""
  vocabulary = HfTokenizerVocabulary(str(FIXTURES / "hf_qwen2_tiny" / "tokenizer.json"))
  assert vocabulary.tokenizer.id_to_token(0) == "!" and 0 in vocabulary.encode("Hi!")
  assert vocabulary.decode(vocabulary.encode("Hi!")) == "Hi!"
