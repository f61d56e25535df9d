"""CLIP: tokenizer and text / vision encoders against transformers (random tiny weights, fp32).

A tiny BPE vocabulary is trained here on a few sentences (the 512 byte symbols plus ~100
merges), so the tokenizer test and the text-encoder test use realistic ids, bos and eos.
"""

import collections
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxgen.convert import from_transformers  # noqa: E402
from jaxgen.errors import ConfigError, DataError, WeightsError  # noqa: E402
from jaxgen.registry import MODELS  # noqa: E402
from jaxgen.text import CLIPTokenizer  # noqa: E402
from jaxgen.text.clip_tokenizer import _PIECES, bytes_to_unicode, piece_pattern  # noqa: E402

CORPUS = ("a photo of a cat. a photo of a dog! the man and the woman on the left, a 3 and a 7 "
          "on the right; it's a photo, don't they're photos of cats and dogs")
TEXTS = ["A photo of a CAT.", "  the man\tand the   woman on the left  ",
         "a 3 and a 7 on the right", "It's 2024: don't!! they're", "naïve café — über ½",
         "photo<|endoftext|>cat", "snake_case + x_1 = 2_000, ok?", "dog " * 60, ""]
TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def _train_bpe(directory, corpus: str, num_merges: int = 100):
  """Writes vocab.json / merges.txt laid out as CLIP's: bytes, bytes</w>, merges, specials."""
  byte_map = bytes_to_unicode()
  vocab = list(byte_map.values()) + [c + "</w>" for c in byte_map.values()]
  words = collections.Counter()
  for piece in _PIECES.findall(corpus.lower()):
    s = "".join(byte_map[b] for b in piece.encode())
    words[tuple(s[:-1]) + (s[-1] + "</w>",)] += 1
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for w, c in words.items():
      for p in zip(w, w[1:]):
        pairs[p] += c
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    vocab.append(best[0] + best[1])
    merged = collections.Counter()
    for w, c in words.items():
      out, i = [], 0
      while i < len(w):
        if i < len(w) - 1 and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      merged[tuple(out)] += c
    words = merged
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return len(vocab)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("clip_tokenizer")
  _train_bpe(str(d), CORPUS)
  return str(d)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


# -- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_matches_transformers(tokenizer_dir, tmp_path):
  hf = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  mine = CLIPTokenizer.from_pretrained(tokenizer_dir)
  assert mine.vocab_size == len(hf)
  assert (mine.bos_token_id, mine.eos_token_id, mine.pad_token_id) == (
      hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
  batch = mine(TEXTS)
  assert batch["input_ids"].shape == (len(TEXTS), 77) and batch["input_ids"].dtype == np.int32
  for i, text in enumerate(TEXTS):
    assert mine.tokenize(text) == hf.tokenize(text), text
    want = hf(text, padding="max_length", max_length=77, truncation=True)
    assert batch["input_ids"][i].tolist() == list(want["input_ids"]), text
    assert batch["attention_mask"][i].tolist() == list(want["attention_mask"]), text
    assert mine.encode(text) == list(hf(text)["input_ids"]), text
  # Truncation keeps bos ... eos; padding uses the pad token.
  long_row = batch["input_ids"][TEXTS.index("dog " * 60)]
  assert long_row[0] == mine.bos_token_id and long_row[-1] == mine.eos_token_id
  assert batch["input_ids"][-1, :3].tolist() == [mine.bos_token_id, mine.eos_token_id,
                                                 mine.pad_token_id]
  assert mine.decode(batch["input_ids"][0]) == "a photo of a cat ."
  # A directory as transformers 5 saves it (tokenizer.json only), found under tokenizer/.
  hf.save_pretrained(str(tmp_path / "tokenizer"))
  assert not (tmp_path / "tokenizer" / "vocab.json").exists()
  again = CLIPTokenizer.from_pretrained(str(tmp_path))
  assert again(TEXTS)["input_ids"].tolist() == batch["input_ids"].tolist()
  assert again.model_max_length == 77
  short = mine(TEXTS[:3], padding=False)["input_ids"]
  assert short.shape == (3, max(len(mine.encode(t)) for t in TEXTS[:3]))
  # Without the `regex` package the `re` approximation tokenizes ASCII text identically.
  fallback = CLIPTokenizer.from_pretrained(tokenizer_dir)
  fallback._pieces = piece_pattern(unicode_classes=False)  # pylint: disable=protected-access
  ascii_texts = [t for t in TEXTS if t.isascii()]
  assert fallback(ascii_texts)["input_ids"].tolist() == mine(ascii_texts)["input_ids"].tolist()
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="no CLIP tokenizer files"):
    CLIPTokenizer.from_pretrained(str(tmp_path / "empty"))


# -- encoders ----------------------------------------------------------------------------------


def _clip_config(vocab_size, bos, eos, act, eos_token_id):
  text = dict(TOWER, vocab_size=vocab_size, max_position_embeddings=77, hidden_act=act,
              bos_token_id=bos, eos_token_id=eos_token_id, pad_token_id=eos)
  vision = dict(TOWER, image_size=32, patch_size=8, hidden_act=act)
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def _perturb(model, seed=0):
  """Moves LayerNorms / biases off their init (ones / zeros) so every tensor is exercised."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model.eval()


@pytest.mark.parametrize("act,legacy_eos", [("quick_gelu", False), ("gelu", True)])
def test_clip_model_parity(tokenizer_dir, tmp_path, act, legacy_eos):
  """Hidden states, pooled and projected features, logits: transformers vs jaxgen, 1e-4 rel.

  legacy_eos: config eos_token_id 2 (pre-#24773 hub configs) pools at the largest id.
  """
  tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
  config = _clip_config(tok.vocab_size, tok.bos_token_id, tok.eos_token_id, act,
                        2 if legacy_eos else tok.eos_token_id)
  torch.manual_seed(0)
  ref = _perturb(transformers.CLIPModel(config))
  ref.save_pretrained(str(tmp_path), safe_serialization=True)
  model, variables = from_transformers(str(tmp_path))
  assert model.text_model.hidden_act == act
  assert model.text_model.eos_token_id == (2 if legacy_eos else tok.eos_token_id)

  batch = tok(["a photo of a cat", "the man on the left and a 7 on the right", "dogs!"],
              max_length=16)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  pixels = np.random.RandomState(1).randn(3, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    t_ids, t_mask, t_px = (torch.tensor(ids, dtype=torch.long), torch.tensor(mask),
                           torch.tensor(pixels))
    text_ref = ref.text_model(input_ids=t_ids, attention_mask=t_mask)
    text_features = ref.get_text_features(input_ids=t_ids, attention_mask=t_mask)
    image_ref = ref.vision_model(pixel_values=t_px)
    image_features = ref.get_image_features(pixel_values=t_px)
    full = ref(input_ids=t_ids, pixel_values=t_px, attention_mask=t_mask)
  pixels_nhwc = pixels.transpose(0, 2, 3, 1)
  text = model.apply(variables, ids, mask, method="text_outputs")
  image = model.apply(variables, pixels_nhwc, method="image_outputs")
  tol = 1e-4
  assert _rel(text["last_hidden_state"], text_ref.last_hidden_state) < tol
  assert _rel(text["pooler_output"], text_ref.pooler_output) < tol
  assert _rel(text["text_embeds"], text_features.pooler_output) < tol
  assert _rel(image["last_hidden_state"], image_ref.last_hidden_state) < tol
  assert _rel(image["pooler_output"], image_ref.pooler_output) < tol
  assert _rel(image["image_embeds"], image_features.pooler_output) < tol
  # The documented entry points return the same arrays.
  assert _rel(model.apply(variables, ids, mask, method="encode_text"),
              text_features.pooler_output) < tol
  assert _rel(model.apply(variables, pixels_nhwc, method="encode_image"),
              image_features.pooler_output) < tol
  assert _rel(model.apply(variables, ids, mask, method="text_hidden_states"),
              text_ref.last_hidden_state) < tol
  out = model.apply(variables, ids, pixels_nhwc, mask)
  assert _rel(out["logits_per_image"], full.logits_per_image) < tol
  assert _rel(out["text_embeds"], full.text_embeds) < tol
  # Without a padding mask the causal mask alone decides (as transformers).
  with torch.no_grad():
    no_mask = ref.text_model(input_ids=t_ids).last_hidden_state
  assert _rel(model.apply(variables, ids, method="text_hidden_states"), no_mask) < tol


def test_single_tower_directories(tmp_path):
  """CLIPTextModel (no projection; transformers 5 saves it without the text_model. prefix),
  CLIPTextModelWithProjection and CLIPVisionModelWithProjection."""
  text_cfg = transformers.CLIPTextConfig(**TOWER, vocab_size=50, max_position_embeddings=12,
                                         bos_token_id=48, eos_token_id=49, pad_token_id=49,
                                         projection_dim=16)
  vision_cfg = transformers.CLIPVisionConfig(**TOWER, image_size=16, patch_size=4,
                                             projection_dim=16)
  ids = np.array([[48, 3, 4, 5, 49, 49], [48, 10, 20, 30, 40, 49]])
  pixels = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
  torch.manual_seed(1)
  cases = [
      ("text", transformers.CLIPTextModel(text_cfg), "text_hidden_states", "encode_text",
       lambda o: (o.last_hidden_state, o.pooler_output)),
      ("text_proj", transformers.CLIPTextModelWithProjection(text_cfg), "text_hidden_states",
       "encode_text", lambda o: (o.last_hidden_state, o.text_embeds)),
      ("vision_proj", transformers.CLIPVisionModelWithProjection(vision_cfg),
       "image_hidden_states", "encode_image", lambda o: (o.last_hidden_state, o.image_embeds)),
  ]
  for name, ref, hidden_method, embed_method, outputs in cases:
    ref = _perturb(ref)
    ref.save_pretrained(str(tmp_path / name), safe_serialization=True)
    model, variables = from_transformers(str(tmp_path / name))
    x = ids if name.startswith("text") else pixels
    with torch.no_grad():
      want_hidden, want_embeds = outputs(ref(torch.tensor(x)))
    x = x if name.startswith("text") else x.transpose(0, 2, 3, 1)
    assert _rel(model.apply(variables, x, method=hidden_method), want_hidden) < 1e-4, name
    assert _rel(model.apply(variables, x, method=embed_method), want_embeds) < 1e-4, name
    assert (model.projection_dim is None) == (name == "text"), name
  with pytest.raises(ConfigError, match="no vision_model"):
    model, variables = from_transformers(str(tmp_path / "text_proj"))
    model.apply(variables, pixels.transpose(0, 2, 3, 1), method="encode_image")


def test_weights_errors_name_tensors(tmp_path):
  cfg = transformers.CLIPTextConfig(**TOWER, vocab_size=50, max_position_embeddings=12,
                                    bos_token_id=48, eos_token_id=49, pad_token_id=49)
  transformers.CLIPTextModelWithProjection(cfg).save_pretrained(str(tmp_path),
                                                                safe_serialization=True)
  path = str(tmp_path / "model.safetensors")
  state = load_file(path)
  dropped = "text_model.encoder.layers.1.mlp.fc2.weight"
  del state[dropped]
  state["text_model.encoder.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
  save_file(state, path)
  with pytest.raises(WeightsError) as err:
    from_transformers(str(tmp_path))
  message = str(err.value)
  assert "text_model/layers_1/fc2/kernel" in message
  assert "text_model.encoder.layers.0.self_attn.extra.weight" in message
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  config["model_type"] = "bert"
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(WeightsError, match="no converter"):
    from_transformers(str(tmp_path))


def test_registry_builds_from_hub_config():
  config = _clip_config(99, 97, 98, "quick_gelu", 98).to_dict()
  model = MODELS.get("clip")(**config)
  assert model.text_model.vocab_size == 99 and model.vision_model.patch_size == 8
  assert model.projection_dim == 24
  with pytest.raises(ConfigError, match="hidden_act"):
    MODELS.get("clip")(text_config=dict(hidden_act="swishy"))
