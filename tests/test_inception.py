"""FID Inception-v3 (jaxgen.metrics.inception): parity with a PyTorch build of pytorch-fid's
network on random weights, the resize against torch's F.interpolate, the weights loaders.

torchvision (whose Inception3 pytorch-fid patches) does not load with the CPU torch build here,
so the reference is written below with torch.nn, block by block after pytorch-fid's
FIDInceptionA/C/E_1/E_2 and torchvision's InceptionB/D and BasicConv2d.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxgen.errors import WeightsError
from jaxgen.metrics import inception

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class Basic(nn.Module):
  def __init__(self, cin, cout, kernel, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class A(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = Basic(cin, 64, 1)
    self.branch5x5_1 = Basic(cin, 48, 1)
    self.branch5x5_2 = Basic(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = Basic(cin, 64, 1)
    self.branch3x3dbl_2 = Basic(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = Basic(96, 96, 3, padding=1)
    self.branch_pool = Basic(cin, pool_features, 1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(tf_avg_pool(x))], 1)


class B(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = Basic(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = Basic(cin, 64, 1)
    self.branch3x3dbl_2 = Basic(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = Basic(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class C(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = Basic(cin, 192, 1)
    self.branch7x7_1 = Basic(cin, c7, 1)
    self.branch7x7_2 = Basic(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = Basic(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = Basic(cin, c7, 1)
    self.branch7x7dbl_2 = Basic(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = Basic(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = Basic(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = Basic(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = Basic(cin, 192, 1)

  def forward(self, x):
    d = x
    for i in range(1, 6):
      d = getattr(self, f"branch7x7dbl_{i}")(d)
    return torch.cat([self.branch1x1(x),
                      self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                      self.branch_pool(tf_avg_pool(x))], 1)


class D(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = Basic(cin, 192, 1)
    self.branch3x3_2 = Basic(192, 320, 3, stride=2)
    self.branch7x7x3_1 = Basic(cin, 192, 1)
    self.branch7x7x3_2 = Basic(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = Basic(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = Basic(192, 192, 3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, 3, stride=2)], 1)


class E(nn.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.pool = pool
    self.branch1x1 = Basic(cin, 320, 1)
    self.branch3x3_1 = Basic(cin, 384, 1)
    self.branch3x3_2a = Basic(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = Basic(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = Basic(cin, 448, 1)
    self.branch3x3dbl_2 = Basic(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = Basic(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = Basic(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = Basic(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                      self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                      self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
  """pytorch-fid's fid_inception_v3() (aux_logits=False, 1008 classes) + its InceptionV3 input
  handling (bilinear resize to 299 of [0, 1] images, then 2x - 1)."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = Basic(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = Basic(32, 32, 3)
    self.Conv2d_2b_3x3 = Basic(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = Basic(64, 80, 1)
    self.Conv2d_4a_3x3 = Basic(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
    self.Mixed_6a = B(288)
    self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
    self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
    self.Mixed_7a = D(768)
    self.Mixed_7b, self.Mixed_7c = E(1280, "avg"), E(2048, "max")
    self.fc = nn.Linear(2048, 1008)

  def forward(self, x01):
    x = F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    return pool, self.fc(pool)


def _unit_rms(bn, args):
  """BatchNorm pre-hook: running mean 0 and running variance = the input's mean square per
  channel, so every layer's output has unit RMS without subtracting a large mean (which would
  amplify fp32 round-off, through 94 layers, beyond what the parity test can resolve)."""
  bn.running_mean.zero_()
  bn.running_var.copy_(args[0].pow(2).mean((0, 2, 3)))


@pytest.fixture(scope="module")
def reference():
  """A random-weight torch network with BatchNorm statistics fitted to its inputs (activations
  stay O(1)), its inputs in [0, 1] (NHWC numpy) and its outputs."""
  torch.manual_seed(0)
  model = TorchFIDInception().eval()
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
  for bn in bns:
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.2, 0.2)
  rng = np.random.default_rng(0)
  # Smooth random images (low-frequency noise, upsampled), resized to 299 by the network.
  x = F.interpolate(torch.from_numpy(rng.random((2, 3, 12, 12), np.float32)), size=(64, 64),
                    mode="bicubic", align_corners=False).clamp(0, 1)
  with torch.no_grad():
    hooks = [bn.register_forward_pre_hook(_unit_rms) for bn in bns]
    model(x)
    for h in hooks:
      h.remove()
    pool, logits = model(x)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return state, x.permute(0, 2, 3, 1).numpy(), pool.numpy(), logits.numpy()


def test_matches_torch_reference(reference):
  state, images, pool, logits = reference
  assert "Conv2d_1a_3x3.bn.num_batches_tracked" in state  # Skipped by the converter.
  variables = inception.convert_state_dict(state)
  out = jax.jit(inception.outputs, static_argnums=2)(variables, images, (0.0, 1.0))
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  # Informative features: O(1), different per image (post-ReLU means, so >= 0).
  assert np.std(pool) > 0.1 and np.all(pool >= 0) and np.abs(pool[0] - pool[1]).max() > 0.1
  scale = np.abs(pool).max()
  np.testing.assert_allclose(out["pool"], pool, rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
  # uint8 input is /255 (as pytorch-fid's ToTensor); grey images are repeated to RGB.
  x8 = (images * 255).round().astype(np.uint8)
  np.testing.assert_allclose(inception.prepare(x8), inception.prepare(x8 / 255.0), atol=1e-6)
  grey = inception.prepare(images[..., :1], (0, 1), size=32)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (256, 256), (512, 512), (300, 300),
                                (1000, 1000), (37, 53)])
def test_resize_matches_torch_bilinear(hw):
  """Up- and down-sampling, integer and fractional ratios, as pytorch-fid resizes."""
  x = np.random.default_rng(hw[0]).random((2,) + hw + (3,), np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(inception.resize_bilinear(jnp.asarray(x), 299))
  np.testing.assert_allclose(ours, ref, atol=3e-7)
  np.testing.assert_allclose(inception.prepare(x), 2 * ref - 1, atol=1e-6)


def test_weights_files(reference, tmp_path):
  state = reference[0]
  pth, st = str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
  assert inception.main([f"--src={pth}", f"--dst={st}"]) == 0
  assert inception.main([f"--src={pth}"]) == 2  # Usage error: one `error:` line, exit 2.
  for path in (pth, st):
    module, variables = inception.load_inception(path)
    assert isinstance(module, inception.InceptionV3)
    np.testing.assert_array_equal(variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"],
                                  np.transpose(state["Mixed_7c.branch_pool.conv.weight"],
                                               (2, 3, 1, 0)))
    np.testing.assert_array_equal(variables["batch_stats"]["Mixed_5b"]["branch1x1"]["bn"]["var"],
                                  state["Mixed_5b.branch1x1.bn.running_var"])
  # Missing file: the error names the download and the config key.
  with pytest.raises(WeightsError, match=r"pt_inception-2015-12-05.*eval\.inception_weights"):
    inception.load_inception(str(tmp_path / "nope.pth"))
  # Incomplete or foreign state dicts name the tensors.
  broken = dict(state)
  del broken["Mixed_6e.branch7x7dbl_5.conv.weight"]
  broken["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  with pytest.raises(WeightsError, match=r"Mixed_6e/branch7x7dbl_5/conv/kernel.*AuxLogits"):
    inception.convert_state_dict(broken)
  # A pickle that would run code is refused by torch.load(weights_only=True).
  evil = str(tmp_path / "evil.pth")

  class Evil:
    def __reduce__(self):
      return (print, ("this must never run",))
  torch.save({"x": Evil()}, evil)
  with pytest.raises(WeightsError, match="not a readable PyTorch state dict"):
    inception.load_inception(evil)
