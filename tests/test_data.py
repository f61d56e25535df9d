"""Data pipelines: embedded MNIST-5k and photos, tfds (mocked and unprepared), sharding, state."""

import collections
import itertools
import json

import ml_collections
import numpy as np
import pytest

from jaxgen import data
from jaxgen.data import embedded
from jaxgen.data import transforms
from jaxgen.errors import ConfigError, DataError


def _config(**kw):
  c = dict(source="mnist5k", tfds_name="", tfds_data_dir="", image_size=28, random_flip=False,
           num_classes=10)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _keys(images):
  """One hashable key per image (the MNIST-5k digits are all distinct)."""
  return [x.tobytes() for x in np.asarray(images)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# --- mnist5k ---------------------------------------------------------------------------------


def test_mnist_shapes_ranges_and_padding():
  info = data.dataset_info(_config(image_size=32))
  assert info == data.DatasetInfo((32, 32, 1), 10, 4000)
  it = data.make_iterator(_config(image_size=32), global_batch_size=16, seed=0,
                          process_index=0, process_count=1)
  batch = next(it)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (16, 32, 32, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  # 32 = 28 + 2 pixels of background (-1) on each side; the 28x28 centre is the native digit.
  x32, _ = data.load_arrays(_config(image_size=32), "test")
  x28, _ = data.load_arrays(_config(image_size=28), "test")
  assert x28.shape == (1000, 28, 28, 1)
  np.testing.assert_array_equal(x32[:, 2:30, 2:30], x28)
  border = np.concatenate([x32[:, :2].ravel(), x32[:, 30:].ravel(), x32[:, :, :2].ravel(),
                           x32[:, :, 30:].ravel()])
  assert np.all(border == -1)
  # Any other size resizes.
  assert data.load_arrays(_config(image_size=16), "test")[0].shape == (1000, 16, 16, 1)


def test_mnist_is_real_digits():
  x, y = data.load_arrays(_config(), "train")
  xt, yt = data.load_arrays(_config(), "test")
  assert x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y), [400] * 10)
  np.testing.assert_array_equal(np.bincount(yt), [100] * 10)
  assert x.min() == -1 and x.max() == 1
  # Digits: mostly background, a sizeable minority of ink, centred (empty outer frame).
  assert 0.7 < np.mean(x == -1) < 0.9
  assert 0.05 < np.mean(x > 0.5) < 0.25
  assert np.mean(x[:, :2] > 0) < 0.01
  means = np.stack([x[y == c].mean(0).ravel() for c in range(10)])
  dists = np.linalg.norm(means[:, None] - means[None], axis=-1)
  assert dists[~np.eye(10, dtype=bool)].min() > 2.0  # Class means clearly differ.
  # "1"s use the least ink; a nearest-class-mean classifier far beats chance on held-out digits.
  assert np.argmin(means.mean(1)) == 1
  pred = np.argmin(((xt.reshape(1000, 1, -1) - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(pred == yt) > 0.7


def test_mnist_split_sizes_disjoint_and_fixed():
  train, test = embedded.mnist5k_split_indices("train"), embedded.mnist5k_split_indices("test")
  assert len(train) == 4000 and len(test) == 1000
  assert not set(train) & set(test) and len(set(train) | set(test)) == 5000
  x, _ = data.load_arrays(_config(), "train")
  xt, _ = data.load_arrays(_config(), "test")
  assert not set(_keys(x)) & set(_keys(xt))
  # The split is fixed (constant seed), not drawn per run.
  perm = np.random.default_rng(embedded.SPLIT_SEED).permutation(5000)
  labels = embedded.mnist5k_raw()[1]
  np.testing.assert_array_equal(test, np.sort(perm[np.argsort(labels[perm], kind="stable")][::5]))
  with pytest.raises(ConfigError, match="train"):
    data.load_arrays(_config(), "validation")


# --- iterator: determinism, epochs, state, sharding ------------------------------------------


def _it(seed=0, batch=100, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  cfg = kw.pop("config", _config())
  return data.make_iterator(cfg, global_batch_size=batch, seed=seed, **kw)


def test_determinism_by_seed():
  a, b, c = _take(_it(seed=1), 3), _take(_it(seed=1), 3), _take(_it(seed=2), 3)
  _assert_same_batches(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  # Unshuffled: the split in file order.
  x, y = data.load_arrays(_config(), "train")
  first = next(_it(shuffle=False))
  np.testing.assert_array_equal(first["image"], x[:100])
  np.testing.assert_array_equal(first["label"], y[:100])


def test_epochs_cover_split_and_reshuffle():
  x, _ = data.load_arrays(_config(), "train")
  train = collections.Counter(_keys(x))
  epoch = list(_it(num_epochs=1))
  assert len(epoch) == 40
  assert collections.Counter(_keys(np.concatenate([b["image"] for b in epoch]))) == train
  # Infinite stream: epoch 2 is a fresh permutation of the same examples.
  forever = _take(_it(), 80)
  first = _keys(np.concatenate([b["image"] for b in forever[:40]]))
  second = _keys(np.concatenate([b["image"] for b in forever[40:]]))
  assert collections.Counter(second) == train and first != second
  # Finite with drop_remainder=False keeps the partial last batch.
  sizes = [len(b["label"]) for b in _it(batch=384, num_epochs=1, drop_remainder=False)]
  assert sizes == [384] * 10 + [160]
  assert len(list(_it(batch=384, num_epochs=1))) == 10


@pytest.mark.parametrize("skip", [3, 38])  # 38 batches of 104: the next ones cross the epoch.
def test_state_restore_gives_identical_batches(skip):
  cfg = _config(image_size=32, random_flip=True)  # Flips: augmentation must also resume.
  it = _it(config=cfg, batch=104)
  _take(it, skip)
  state = json.loads(json.dumps(it.get_state()))
  assert state["examples_consumed"] == skip * 104
  expected = _take(it, 4)
  restored = _it(config=cfg, batch=104)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 4), expected)
  # The state is the same on every process: two processes resume the two halves.
  halves = [_it(config=cfg, batch=104, process_index=p, process_count=2) for p in (0, 1)]
  for h in halves:
    h.set_state(state)
  for batch in expected:
    parts = [next(h) for h in halves]
    assert collections.Counter(_keys(batch["image"])) == collections.Counter(
        _keys(np.concatenate([p["image"] for p in parts])))
  # Another global batch size that divides the consumed count continues the same stream.
  if skip * 104 % 52 == 0:
    small = _it(config=cfg, batch=52)
    small.set_state(state)
    np.testing.assert_array_equal(next(small)["image"], expected[0]["image"][:52])
  with pytest.raises(DataError, match="seed"):
    _it(config=cfg, batch=104, seed=5).set_state(state)


def test_two_processes_disjoint_and_cover_epoch():
  x, _ = data.load_arrays(_config(), "train")
  shards = [list(_it(batch=200, num_epochs=1, process_index=p, process_count=2)) for p in (0, 1)]
  assert [len(s) for s in shards] == [20, 20]
  assert all(b["image"].shape == (100, 28, 28, 1) for s in shards for b in s)
  keys = [_keys(np.concatenate([b["image"] for b in s])) for s in shards]
  assert not set(keys[0]) & set(keys[1])
  assert collections.Counter(keys[0] + keys[1]) == collections.Counter(_keys(x))
  # Step by step, the two shards together are the single-process global batch.
  single = next(_it(batch=200))
  assert set(_keys(single["image"])) == set(_keys(np.concatenate(
      [shards[0][0]["image"], shards[1][0]["image"]])))
  with pytest.raises(ConfigError, match="multiple"):
    _it(batch=201, process_index=0, process_count=2)


def test_default_process_shard_is_this_process():
  it = data.make_iterator(_config(), global_batch_size=8, seed=0)
  assert next(it)["image"].shape == (8, 28, 28, 1)


def test_config_errors():
  with pytest.raises(ConfigError, match="mnist5k.*photos.*tfds"):
    data.dataset_info(_config(source="nope"))
  with pytest.raises(ConfigError, match="num_classes=10"):
    data.dataset_info(_config(num_classes=7))
  with pytest.raises(ConfigError, match="tfds_name"):
    data.dataset_info(_config(source="tfds", tfds_name=""))


# --- photos ----------------------------------------------------------------------------------


def _photos(**kw):
  return _config(source="photos", num_classes=1, image_size=kw.pop("image_size", 16), **kw)


def _found_in(crop, photo):
  """Whether `crop` is a sub-window of `photo` (both float HWC)."""
  s = crop.shape[0]
  windows = np.lib.stride_tricks.sliding_window_view(photo, (s, s, 3))[..., 0, :, :, :]
  top = np.all(windows[:, :, 0] == crop[0], axis=(-1, -2))  # Cheap pre-filter: first row.
  return any(np.array_equal(photo[i:i + s, j:j + s], crop) for i, j in zip(*np.nonzero(top)))


def test_photos_train_crops():
  cfg = _photos(random_flip=True)
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo((16, 16, 3), 1, len(embedded.TRAIN_PHOTOS) * 100)
  a = _take(_it(config=cfg, batch=8), 3)
  _assert_same_batches(a, _take(_it(config=cfg, batch=8), 3))
  images = np.concatenate([b["image"] for b in a])
  assert images.dtype == np.float32 and images.shape == (24, 16, 16, 3)
  assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1
  assert len(set(_keys(images))) == 24  # Random crops differ.
  assert np.all(np.concatenate([b["label"] for b in a]) == 0)
  # Without flips every crop is a window of a training photo (and of no test photo).
  crops = next(_it(config=_photos(), batch=4))["image"]
  train = [transforms.to_float(embedded.load_photo(f)) for f in embedded.TRAIN_PHOTOS]
  test = [transforms.to_float(embedded.load_photo(f)) for f in embedded.TEST_PHOTOS]
  for crop in crops[:2]:
    assert any(_found_in(crop, p) for p in train)
    assert not any(_found_in(crop, p) for p in test)


def test_random_channel_order_permutes_the_same_crops():
  plain = next(_it(config=_photos(), batch=32))["image"]
  permuted = next(_it(config=_photos(random_channel_order=True), batch=32))["image"]
  orders = set()
  for x, y in zip(plain, permuted):  # The crop is drawn first: the same windows.
    found = [p for p in itertools.permutations(range(3)) if np.array_equal(x[..., p], y)]
    assert found
    orders.add(found[0])
  assert len(orders) > 2
  test = _photos(random_channel_order=True)  # Evaluation streams are never permuted.
  np.testing.assert_array_equal(next(_it(config=test, split="test", batch=4))["image"],
                                next(_it(config=_photos(), split="test", batch=4))["image"])


def test_photos_test_split_is_held_out_grid():
  assert len(embedded.TEST_PHOTOS) >= 2
  assert not set(embedded.TEST_PHOTOS) & set(embedded.TRAIN_PHOTOS)
  photos = {f: embedded.load_photo(f) for f in embedded.TRAIN_PHOTOS + embedded.TEST_PHOTOS}
  assert all(p.ndim == 3 and p.shape[-1] == 3 and p.dtype == np.uint8 for p in photos.values())
  # No test photo is (a resize/copy of) a train photo: their colour statistics differ.
  for t in embedded.TEST_PHOTOS:
    for f in embedded.TRAIN_PHOTOS:
      assert np.abs(photos[t].mean((0, 1)) - photos[f].mean((0, 1))).max() > 1
  cfg = _photos(image_size=128)
  xt, yt = data.load_arrays(cfg, "test")
  expected = sum((p.shape[0] // 128) * (p.shape[1] // 128)
                 for p in (photos[f] for f in embedded.TEST_PHOTOS))
  assert xt.shape == (expected, 128, 128, 3) and np.all(yt == 0)
  assert xt.min() >= -1 and xt.max() <= 1
  # Fixed crops: the first is the top-left cell of chelsea's centred grid (300x451 -> 2x3).
  chelsea = photos["chelsea.png"]
  oy, ox = (300 - 256) // 2, (451 - 384) // 2
  np.testing.assert_allclose(xt[0], chelsea[oy:oy + 128, ox:ox + 128] / 127.5 - 1, atol=1e-6)
  # The test iterator gives the same fixed crops, unflipped even with random_flip.
  batch = next(data.make_iterator(_photos(image_size=128, random_flip=True), split="test",
                                  global_batch_size=4, seed=0, shuffle=False,
                                  process_index=0, process_count=1))
  np.testing.assert_array_equal(batch["image"], xt[:4])


# --- tfds ------------------------------------------------------------------------------------


def test_tfds_mocked_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _config(source="tfds", tfds_name="cifar10", tfds_data_dir=str(tmp_path), image_size=32,
                random_flip=True)
  # tmp_path holds nothing, so only the mocked data_source can serve these reads.
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    assert data.dataset_info(cfg) == data.DatasetInfo((32, 32, 3), 10, 24)
    it = _it(config=cfg, batch=8)
    a = _take(it, 4)  # Crosses the 24-example epoch.
    assert a[0]["image"].shape == (8, 32, 32, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].dtype == np.int32 and np.all((a[0]["label"] >= 0) & (a[0]["label"] < 10))
    assert a[0]["image"].min() >= -1 and a[0]["image"].max() <= 1
    state = it.get_state()
    expected = _take(it, 2)
    restored = _it(config=cfg, batch=8)
    restored.set_state(state)
    _assert_same_batches(_take(restored, 2), expected)
    x, y = data.load_arrays(cfg, "test")
    assert x.shape == (24, 32, 32, 3) and y.shape == (24,)
    # Non-32 images (imagenet2012's vary in size): shorter side resized, centre crop.
    inet = _config(source="tfds", tfds_name="imagenet2012", tfds_data_dir=str(tmp_path),
                   image_size=24, num_classes=1000)
    assert data.dataset_info(inet).image_shape == (24, 24, 3)
    batch = next(_it(config=inet, batch=4, split="validation"))
    assert batch["image"].shape == (4, 24, 24, 3) and batch["label"].max() < 1000


def test_tfds_unprepared_raises_with_build_command(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  cfg = _config(source="tfds", tfds_name="cifar10", tfds_data_dir=str(tmp_path), image_size=32)
  with pytest.raises(DataError, match="tfds build") as e:
    data.dataset_info(cfg)
  msg = str(e.value)
  assert "cifar10" in msg and str(tmp_path) in msg and "--file_format=array_record" in msg
  with pytest.raises(DataError, match="tfds build"):
    _it(config=cfg, batch=8)
  inet = _config(source="tfds", tfds_name="imagenet2012", tfds_data_dir=str(tmp_path),
                 image_size=64, num_classes=1000)
  with pytest.raises(DataError, match="manual"):
    data.dataset_info(inet)
  with pytest.raises(DataError, match="no dataset named"):
    data.dataset_info(_config(source="tfds", tfds_name="no_such_dataset_xyz"))
