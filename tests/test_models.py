"""The architectures the library is proven on: ResNet-18 and ResNet-50 with BatchNorm, and a tiny Hugging Face BERT.

The Fashion-MNIST test is skipped where Debian's ``dataset-fashion-mnist`` is missing, except under
CI (``CI=true``), where a missing data set fails it. The BERT tests are skipped without
``transformers``, except under CI, which installs it (the test extra).
"""

import numpy as np
import pytest
import torch
from torch import nn

from actclust.models import Bottleneck, accuracy, resnet18, resnet50, train_classifier

from conftest import in_ci, require_fashion_mnist


@pytest.fixture
def one_thread():
    """Train small models on one thread: on a shared 2-core machine, two OpenMP threads waited on
    each other (a 1-epoch ResNet fit took 70-106 s instead of 2.6 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fashion_mnist():
    from actclust.datasets import load_fashion_mnist

    require_fashion_mnist()
    return load_fashion_mnist()


def outputs(model, x, names):
    """Output of each named module in one forward pass."""
    out, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda mod, inp, o, name=name: out.__setitem__(name, o)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


# ---------------------------------------------------------------- ResNet-18

def test_resnet18_names_are_torchvision():
    # The top-level and block names are torchvision's, so users can pick the layers they know.
    model = resnet18(width=8)
    assert [n for n, _ in model.named_children()] == [
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert isinstance(model.maxpool, nn.Identity)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert len(model.get_submodule(stage)) == 2
    assert [n for n, _ in model.layer2[0].named_children()] == ["conv1", "bn1", "relu", "conv2", "bn2", "downsample"]
    downsampled = sorted(n for n, m in model.named_modules() if n.endswith("downsample"))
    assert downsampled == ["layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"]
    assert [type(m) for m in model.layer2[0].downsample] == [nn.Conv2d, nn.BatchNorm2d]


def test_resnet18_shapes():
    # A 28x28 input keeps full resolution through layer1 and halves at each later stage.
    torch.manual_seed(0)
    model = resnet18(width=8).eval()
    x = torch.randn(3, 1, 28, 28)
    out = outputs(model, x, ["conv1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "conv1": (3, 8, 28, 28), "layer1": (3, 8, 28, 28), "layer2": (3, 16, 14, 14),
        "layer3": (3, 32, 7, 7), "layer4": (3, 64, 4, 4), "avgpool": (3, 64, 1, 1), "fc": (3, 10)}
    assert model(x).shape == (3, 10)
    assert resnet18(in_channels=3, n_classes=5, width=4).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_resnet18_width64_is_resnet18():
    # width=64 has ResNet-18's parameters: torchvision's 11,689,512 for 3 channels and 1,000
    # classes, less the 7x7 -> 3x3 stem (3 * 64 * (49 - 9) = 7,680).
    model = resnet18(in_channels=3, n_classes=1000, width=64)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512 - 7_680
    assert model.layer4[1].conv2.out_channels == 512


def test_resnet18_has_batchnorm_buffers():
    # 20 BatchNorm layers, each with running stats and a 0-dim int64 num_batches_tracked.
    model = resnet18(width=8)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * 8 + 3
    buffers = dict(model.named_buffers())
    tracked = {k: v for k, v in buffers.items() if k.endswith("num_batches_tracked")}
    assert len(tracked) == 20
    assert all(v.dim() == 0 and v.dtype == torch.int64 for v in tracked.values())
    assert buffers["layer3.0.downsample.1.running_var"].shape == (32,)


def test_resnet18_batchnorm_updates_only_in_train_mode():
    # A training-mode forward moves the running stats and counts the batch; eval leaves them.
    torch.manual_seed(0)
    model = resnet18(width=8)
    x = torch.randn(4, 1, 28, 28) + 3.0
    model.eval()
    model(x)
    assert int(model.bn1.num_batches_tracked) == 0
    assert torch.equal(model.bn1.running_mean, torch.zeros(8))
    model.train()
    model(x)
    assert int(model.bn1.num_batches_tracked) == 1
    assert not torch.equal(model.bn1.running_mean, torch.zeros(8))


@pytest.mark.slow
def test_resnet18_learns_fashion_mnist(one_thread):
    # One epoch on 3,000 images lifts a width-16 ResNet-18 far above chance (0.1); measured
    # 0.74-0.80 over 6 seeds, about 6 s on one core.
    x_tr, y_tr, x_te, y_te = fashion_mnist()
    torch.manual_seed(0)
    model = train_classifier(resnet18(width=16), x_tr[:3000], y_tr[:3000], epochs=1, batch_size=32, lr=1e-3,
                             seed=0, progress=False)
    assert not model.training
    assert accuracy(model, x_te[:2000], y_te[:2000]) > 0.6


# ---------------------------------------------------------------- ResNet-50

def test_resnet50_is_torchvision_resnet50():
    # torchvision's resnet50(): 25,557,032 parameters for 3 channels and 1,000 classes, its module
    # names, a 7x7 stride-2 stem and max-pool, Bottleneck stages of 3, 4, 6, 3 blocks; a 224x224
    # input reaches the stages at 56, 28, 14 and 7. One forward of one image (about 0.4 s on CPU).
    torch.manual_seed(0)
    model = resnet50().eval()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert [n for n, _ in model.named_children()] == [
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert [len(model.get_submodule(f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert all(isinstance(b, Bottleneck) for i in range(1, 5) for b in model.get_submodule(f"layer{i}"))
    assert [n for n, _ in model.layer2[0].named_children()] == [
        "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"]
    assert model.layer2[0].conv2.stride == (2, 2)  # v1.5, as torchvision: the stride on the 3x3 conv
    downsampled = sorted(n for n, m in model.named_modules() if n.endswith("downsample"))
    assert downsampled == ["layer1.0.downsample", "layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"]
    names = ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    out = outputs(model, torch.randn(1, 3, 224, 224), names)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "maxpool": (64, 56, 56), "layer1": (256, 56, 56), "layer2": (512, 28, 28), "layer3": (1024, 14, 14),
        "layer4": (2048, 7, 7), "avgpool": (2048, 1, 1), "fc": (1000,)}
    assert torch.isfinite(out["fc"]).all()


def test_resnet50_narrow():
    # width=8 keeps the layers with an eighth of the channels; other channels and class counts work.
    model = resnet50(in_channels=1, n_classes=7, width=8).eval()
    out = outputs(model, torch.randn(2, 1, 64, 64), ["layer1", "layer4", "fc"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {"layer1": (2, 32, 16, 16), "layer4": (2, 256, 2, 2),
                                                           "fc": (2, 7)}


# ---------------------------------------------------------------- tiny BERT

@pytest.fixture(scope="module")
def zoo():
    try:
        import transformers  # noqa: F401  (installed by the test extra)
    except ImportError:
        if in_ci():
            pytest.fail("CI must install transformers (the test extra)", pytrace=False)
        pytest.skip("transformers is not installed")
    import zoo

    return zoo


@pytest.fixture(scope="module")
def token_data(zoo):
    ids, mask, y = zoo.token_task(2500, seed=0)
    return (ids[:2000], mask[:2000], y[:2000]), (ids[2000:], mask[2000:], y[2000:])


@pytest.fixture(scope="module")
def trained_bert(zoo, token_data):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread; about 4 s on one core
    try:
        return zoo.train_token_model(zoo.tiny_bert(seed=0), *token_data[0], seed=0)
    finally:
        torch.set_num_threads(before)


def test_token_task_is_right_padded(zoo):
    # int64 ids and mask of varying real length, CLS first, pad id 0 exactly where the mask is 0.
    ids, mask, y = zoo.token_task(300, seq_len=24, seed=0)
    assert ids.shape == mask.shape == (300, 24) and y.shape == (300,)
    assert ids.dtype == mask.dtype == y.dtype == torch.int64
    lengths = mask.sum(1)
    assert lengths.min() >= 16 and lengths.max() == 24 and len(lengths.unique()) > 5
    assert torch.equal(mask, (torch.arange(24) < lengths[:, None]).long())
    assert torch.equal(ids == zoo.PAD, mask == 0)
    assert (ids[:, 0] == zoo.CLS).all()
    assert sorted(y.unique().tolist()) == [0, 1, 2]


def test_token_task_label_is_most_frequent_marker(zoo):
    # Without label noise the label is the marker that occurs most often, and it is unique.
    ids, mask, y = zoo.token_task(300, label_noise=0.0, seed=1)
    counts = torch.stack([(ids == m).sum(1) for m in zoo.MARKERS], 1)
    assert torch.equal(counts.argmax(1), y)
    assert ((counts == counts.max(1, keepdim=True).values).sum(1) == 1).all()
    noisy = zoo.token_task(300, label_noise=0.3, seed=1)[2]
    assert 0.1 < (noisy != y).float().mean() < 0.3


def test_token_task_is_seeded(zoo):
    # The same seed gives the same data set; another seed another one.
    a, b, c = zoo.token_task(50, seed=3), zoo.token_task(50, seed=3), zoo.token_task(50, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_token_task_rejects_bad_parameters(zoo):
    with pytest.raises(ValueError, match=r"The 'n_classes' parameter of token_task must be in \[2, 3\]. Got 4."):
        zoo.token_task(10, n_classes=4)
    with pytest.raises(ValueError, match=r"The 'vocab_size' parameter of token_task must be > 5. Got 5."):
        zoo.token_task(10, vocab_size=5)
    with pytest.raises(ValueError, match=r"The 'min_len' parameter of token_task must be in \[13, seq_len=32\]"):
        zoo.token_task(10, min_len=8)


def test_tiny_bert_is_seeded(zoo):
    # The seed fixes every weight; eager attention is set.
    a, b, c = zoo.tiny_bert(seed=0), zoo.tiny_bert(seed=0), zoo.tiny_bert(seed=1)
    assert a.config._attn_implementation == "eager"
    assert not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["classifier.weight"], sc["classifier.weight"])


def test_trained_bert_beats_chance(zoo, token_data, trained_bert):
    # On held-out sequences it predicts every class and is far above chance (1/3); the label
    # noise caps it near 0.93.
    ids, mask, y = token_data[1]
    assert not trained_bert.training
    with torch.no_grad():
        pred = trained_bert(input_ids=ids, attention_mask=mask).logits.argmax(1)
    assert sorted(pred.unique().tolist()) == [0, 1, 2]
    assert zoo.token_accuracy(trained_bert, ids, mask, y) > 0.8


def test_bert_logits_ignore_extra_padding(token_data, trained_bert):
    # More pad tokens at the end (mask 0) leave the logits unchanged.
    ids, mask, _ = token_data[1]
    extra = torch.zeros(len(ids), 17, dtype=torch.int64)
    with torch.no_grad():
        short = trained_bert(input_ids=ids, attention_mask=mask).logits
        long = trained_bert(input_ids=torch.cat([ids, extra], 1), attention_mask=torch.cat([mask, extra], 1)).logits
    np.testing.assert_allclose(long.numpy(), short.numpy(), rtol=0, atol=1e-5)


# an unknown stem is refused with the choices
def test_resnet_unknown_stem_refused():
    from actclust import ParameterError
    from actclust.models import ResNet

    with pytest.raises(ParameterError, match=r"The 'stem' parameter of ResNet must be 'small' or 'imagenet'. "
                                             r"Got 'cifar' instead."):
        ResNet(stem="cifar")
