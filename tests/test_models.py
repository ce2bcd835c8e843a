"""The model zoo: our towers against kornia's reference implementations given the same weights, and
registry-driven checks that every architecture keeps the conventions the training loop relies on."""

import copy
import functools
import io

import kornia.feature
import numpy as np
import pytest
import torch

from pipeline.losses import LOSSES, batch_loss
from pipeline.models import ModelInfo, create_model, list_models, model_info, model_options, register_model
from pipeline.models.hardnet import FullWindowConv
from pipeline.models.opencv import EXTRA, OPENCV_MODELS, opencv_available
from pipeline.pca import fit_pca

KINDS = {"embedding", "pair_classifier"}


@functools.cache
def _template(name: str) -> torch.nn.Module:
    if name in OPENCV_MODELS and not opencv_available():
        pytest.skip(f"{name} needs the [baselines] extra: {EXTRA}")
    torch.manual_seed(0)
    return create_model(name)


def fresh(name: str) -> torch.nn.Module:
    """A default-configured model in train mode; deep copies of one instance, because orthogonal init
    of the big layers (MatchNet's 8192x1024 FC, HardNet8's 8x8x256x512 conv) costs ~0.5 s per build."""
    return copy.deepcopy(_template(name)).train()


def _move_bn_stats(model, batches: int = 2, batch: int = 8) -> None:
    """A few train-mode forwards move BatchNorm running stats away from their init, so comparisons
    and round trips cover them too."""
    model.train()
    with torch.no_grad():
        size = getattr(model, "input_size", None) or model.patch_size  # kornia's modules: patch_size
        for _ in range(batches):
            model(torch.rand(batch, 1, size, size))
    model.eval()


# ---- kornia equivalence --------------------------------------------------------------------------

KORNIA = {
    "hardnet": lambda: kornia.feature.HardNet(pretrained=False),
    "hardnet8": lambda: kornia.feature.HardNet8(pretrained=False),
    "sosnet": lambda: kornia.feature.SOSNet(pretrained=False),
    "tfeat": lambda: kornia.feature.TFeat(pretrained=False),
}


@pytest.mark.parametrize("name", sorted(KORNIA))
def test_matches_kornia_given_same_weights_both_ways(name):
    ours = fresh(name)
    _move_bn_stats(ours)
    ref = KORNIA[name]()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.eval()
    x = torch.rand(8, 1, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    # ...and kornia's weights load into ours (fresh random weights on kornia's side this time).
    torch.manual_seed(1)
    ref2 = KORNIA[name]()
    _move_bn_stats(ref2)
    ours2 = fresh(name)
    ours2.load_state_dict(ref2.state_dict(), strict=True)
    ours2.eval()
    torch.testing.assert_close(ours2(x), ref2(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_full_window_conv_is_the_convolution(channels_last):
    """The towers' last layer, computed as a GEMM, against torch's own convolution with the same
    weights: output, input gradient and weight gradient (float64, so only the layout can differ)."""
    torch.manual_seed(0)
    ours = FullWindowConv(16, 24, kernel_size=8, bias=False).double()
    ref = torch.nn.Conv2d(16, 24, kernel_size=8, bias=False).double()
    ref.load_state_dict(ours.state_dict(), strict=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours, ref = ours.to(memory_format=fmt), ref.to(memory_format=fmt)
    x = torch.randn(5, 16, 8, 8, dtype=torch.float64).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(xa), ref(xb)
    assert out.shape == expected.shape == (5, 24, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    out.backward(g), expected.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    # any other input size is a plain convolution (a 10x10 input gives 3x3 outputs)
    y = torch.randn(2, 16, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(ours(y), ref(y), rtol=1e-12, atol=1e-12)


def test_hardnet8_with_fitted_pca_matches_kornia():
    ours = fresh("hardnet8")  # pca_dim=128, kornia's
    _move_bn_stats(ours)
    with torch.no_grad():
        components, mean = fit_pca(ours.embed(torch.rand(160, 1, 32, 32)), 128)
    ours.set_pca(components, mean)
    ref = kornia.feature.HardNet8(pretrained=False)
    ref.load_state_dict(ours.state_dict(), strict=True)  # kornia's (512, 128) components layout
    ref.eval()
    # float64: the PCA amplifies float32's summation-order differences (our last layer is a GEMM,
    # kornia's a convolution) to ~1e-5; the layouts must agree beyond that
    x = torch.rand(8, 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ours.double()(x), ref.double()(x), rtol=1e-10, atol=1e-10)


def test_hardnet8_pca_dim_is_configurable():
    torch.manual_seed(0)
    plain = create_model("hardnet8", pca_dim=None)
    _move_bn_stats(plain)
    x = torch.rand(8, 1, 32, 32)
    assert plain(x).shape == (8, 512) and plain.descriptor_dim == 512
    small = create_model("hardnet8", pca_dim=64)
    assert small.components.shape == (512, 64) and small.descriptor_dim == 64
    # Installing a 32-d PCA changes the buffers and the output dimension.
    with torch.no_grad():
        components, mean = fit_pca(plain(torch.rand(64, 1, 32, 32)), 32)
    small.load_state_dict({k: v for k, v in plain.state_dict().items()}, strict=False)
    small.set_pca(components, mean)
    small.eval()
    out = small(x)
    assert out.shape == (8, 32) and small.descriptor_dim == 32
    expected = torch.nn.functional.normalize((plain(x) - mean) @ components.t(), dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_sift_matches_kornia():
    ours = fresh("sift").eval()
    ref = kornia.feature.SIFTDescriptor(patch_size=32, rootsift=True)
    ref.load_state_dict(ours.sift.state_dict(), strict=True)
    x = torch.rand(16, 1, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ours.parameters())


def test_l2net_is_hardnet_without_dropout():
    hardnet = fresh("hardnet")
    _move_bn_stats(hardnet)
    l2net = fresh("l2net")
    # HardNet's Dropout sits at features.18, so its final conv/BN are one index later.
    remap = {k.replace("features.19.", "features.18.").replace("features.20.", "features.19."): v for k, v in hardnet.state_dict().items()}
    l2net.load_state_dict(remap, strict=True)
    l2net.eval()
    x = torch.rand(8, 1, 32, 32)
    torch.testing.assert_close(l2net(x), hardnet(x), rtol=1e-6, atol=1e-6)


def test_matchnet_pair_classifier_api():
    model = fresh("matchnet").eval()
    a, b = torch.rand(3, 1, 64, 64), torch.rand(3, 1, 64, 64)
    fa, fb = model(a), model(b)
    assert fa.shape == (3, 4096)  # 64 x 8 x 8: Caffe's ceil-mode pooling, the paper's F = 4096
    logits = model.score(fa, fb)
    assert logits.shape == (3, 2)
    p = model.match_probability(fa, fb)
    torch.testing.assert_close(p, logits.softmax(1)[:, 1])
    # distance = logit gap: P(match) = sigmoid(-distance), so it ranks pairs as 1 - P(match) does.
    torch.testing.assert_close(torch.sigmoid(-model.distance(fa, fb)), p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="MatchNet.score"):
        model.score(fa, fb[:, :10])


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_matchnet_init_is_orthogonal_with_relu_gain():
    """He-scaled orthogonal init: every weight, as an (out, in * k * k) matrix W, has W W^T = g^2 I
    (or W^T W = g^2 I when out > in), g = sqrt(2) before a ReLU and 1 on the last layer; biases 0.
    The specified init (``init="paper"``) has g = 0.6 and biases 0.01."""
    for init, hidden, last, bias in (("he", 2.0**0.5, 1.0, 0.0), ("paper", 0.6, 0.6, 0.01)):
        torch.manual_seed(0)
        layers = _layers(create_model("matchnet", input_size=32, init=init))
        assert len(layers) == 8  # 5 convs + 3 FC
        for i, m in enumerate(layers):
            w = m.weight.detach().flatten(1).double()
            gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
            g = last if i == len(layers) - 1 else hidden
            torch.testing.assert_close(gram, g * g * torch.eye(len(gram), dtype=torch.float64), atol=1e-5, rtol=0)
            assert torch.all(m.bias == bias)


@pytest.mark.parametrize("size", [32, 64])
def test_matchnet_logits_depend_on_the_patches_at_init(size):
    """The known failure of the specified init: the logit gap (the pair distance) hardly varies across
    pairs, so SGD starts from a constant classifier. With the default init it varies at the scale of
    the logits."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(64, 1, size, size, generator=g), torch.rand(64, 1, size, size, generator=g)
    spread = {}
    for init in ("he", "paper"):
        torch.manual_seed(0)
        model = create_model("matchnet", input_size=size, init=init).eval()
        with torch.no_grad():
            spread[init] = model.distance(model(a), model(b)).std().item()
    assert spread["paper"] < 0.005  # measured ~1e-3 on real patches, ~1e-4 on noise
    assert spread["he"] > 0.05 and spread["he"] > 50 * spread["paper"]


def test_matchnet_input_size_sets_the_feature_size():
    model = create_model("matchnet", input_size=32).eval()
    f = model(torch.rand(2, 1, 32, 32))
    assert f.shape == (2, 1024) == (2, model.descriptor_dim)  # 64 x 4 x 4
    assert model.score(f, f).shape == (2, 2)
    with pytest.raises(ValueError, match="32 or 64"):
        create_model("matchnet", input_size=48)
    with pytest.raises(ValueError, match="init"):
        create_model("matchnet", init="xavier")


def test_siamese_input_sizes_and_dim():
    for size in (32, 64):
        model = create_model("siamese", input_size=size, descriptor_dim=16).eval()
        assert model(torch.rand(2, 1, size, size)).shape == (2, 16)
    with pytest.raises(ValueError, match="32 or 64"):
        create_model("siamese", input_size=48)


# ---- registry-driven conventions ----------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_conventions_shape_and_norm(name):
    model = fresh(name).eval()
    info = model.info
    assert info == model_info(name) and info.name == name
    # the declared sizes are the default-configured model's
    assert (model.input_size, model.descriptor_dim) == (info.input_size, info.descriptor_dim)
    assert info.kind in KINDS and isinstance(info.trainable, bool) and isinstance(info.unit_norm, bool)
    assert (info.kind == "pair_classifier") == hasattr(model, "score")
    assert (info.pca == "own") == hasattr(model, "set_pca") == ("pca_dim" in model_options(name))
    assert info.trainable == any(p.requires_grad for p in model.parameters())
    assert "Shape:" in type(model).__doc__
    x = torch.rand(5, 1, model.input_size, model.input_size)
    out = model(x)
    assert out.shape == (5, model.descriptor_dim)
    if info.unit_norm:
        torch.testing.assert_close(out.norm(dim=1), torch.ones(5), rtol=1e-4, atol=1e-4)
    for bad in (torch.rand(5, 3, model.input_size, model.input_size), torch.rand(5, 1, 16, 16), torch.rand(1, 16, 16)):
        with pytest.raises(ValueError, match="expects patches of shape"):
            model(bad)


@pytest.mark.parametrize("name", list_models())
def test_default_loss_is_known(name):
    info = model_info(name)
    if info.trainable:
        assert info.default_loss in LOSSES
        assert (info.default_loss == "softmax_ce") == (info.kind == "pair_classifier")
    else:
        assert info.default_loss is None


def test_registration_refuses_contradictory_metadata():
    """The registry checks what a module declares when it registers, so a new architecture (or a
    typo in one) fails at import with the model's name, not later inside a training run."""
    from torch import nn

    def declare(name, cls=None, **info):
        fields = dict(input_size=32, descriptor_dim=8, default_loss="hardest_triplet", pca="attach", unit_norm=True)
        cls = cls or type(f"Probe_{name}", (nn.Module,), {})
        return register_model(name, ModelInfo(**{**fields, **info}))(cls)

    with pytest.raises(ValueError, match="model 'probe-a': a trainable model needs a default_loss"):
        declare("probe-a", default_loss=None)
    with pytest.raises(ValueError, match="model 'probe-b': PCA heads are for trainable embedding models"):
        declare("probe-b", kind="pair_classifier", default_loss="softmax_ce")
    with pytest.raises(ValueError, match="model 'probe-c': default_loss must be one of"):
        declare("probe-c", default_loss="hardest_tripplet")
    with pytest.raises(ValueError, match="model 'probe-d': pca='own' needs a pca_dim option"):
        declare("probe-d", pca="own")
    with pytest.raises(ValueError, match="model 'hardnet' is registered twice"):
        declare("hardnet")
    with pytest.raises(TypeError, match="decorates an nn.Module class"):
        register_model("probe-e", model_info("hardnet"))(lambda: None)
    assert not {"probe-a", "probe-b", "probe-c", "probe-d", "probe-e"} & set(list_models())


def _fixed_batch(model, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n matching pairs: random patches and noisy copies of them."""
    g = torch.Generator().manual_seed(seed)
    s = model.input_size
    a = torch.rand(n, 1, s, s, generator=g)
    p = (a + 0.1 * torch.randn(n, 1, s, s, generator=g)).clamp(0, 1)
    return a, p


def _own_loss(name, model, a, p) -> torch.Tensor:
    """The model's default loss on a batch; dropout masks and sampled negatives fixed by the seeds."""
    torch.manual_seed(123)
    fa, fp = model(a), model(p)
    score = model.score if model.info.kind == "pair_classifier" else None
    return batch_loss(model_info(name).default_loss, fa, fp, margin=1.0, score=score, generator=torch.Generator().manual_seed(7))


TRAINABLE = [n for n in list_models() if model_info(n).trainable]  # from the metadata: no model (or cv2) needed


@pytest.mark.parametrize("name", TRAINABLE)
def test_gradients_reach_every_parameter(name):
    model = fresh(name)
    a, p = _fixed_batch(model, 4 if model.input_size > 32 else 8)
    _own_loss(name, model, a, p).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, f"{name}: zero/non-finite gradient for {pname}"


@pytest.mark.parametrize("name", TRAINABLE)
def test_a_few_steps_lower_the_models_own_loss(name):
    model = fresh(name)
    a, p = _fixed_batch(model, 6 if model.input_size > 32 else 10)
    # Plain SGD with a small step: a descent method must lower the loss. MatchNet has no normalisation
    # and its metric network reads 2 x 4096 features at the scale of its input: 0.01 and 0.001 overshoot
    # there (measured: the loss jumps from 0.77 to 28 and 3.6 on the first step), 1e-4 descends.
    lr = 1e-4 if model.info.kind == "pair_classifier" else 0.01
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    before = _own_loss(name, model, a, p).item()
    for _ in range(5):
        opt.zero_grad()
        _own_loss(name, model, a, p).backward()
        opt.step()
    after = _own_loss(name, model, a, p).item()
    assert after < before, f"{name}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("name", list_models())
def test_state_dict_round_trip(name):
    model = fresh(name)
    _move_bn_stats(model, batches=2, batch=4)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = fresh(name)
    with torch.no_grad():  # make sure the load has something to overwrite
        for t in other.state_dict().values():
            if t.is_floating_point():
                t.add_(0.5)
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    other.eval()
    x = torch.rand(4, 1, model.input_size, model.input_size)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


def test_a_foreign_module_is_evaluated_as_an_embedding_of_its_patches():
    """kornia's HardNet carries no ModelInfo: evaluation takes it as an embedding of the patches at the
    size they come in (no resizing), and its pair distances are L2 distances."""
    from pipeline.evaluate import describe, pair_distances
    from pipeline.models import info_of

    foreign = KORNIA["hardnet"]().eval()
    assert info_of(foreign) is None and info_of(fresh("hardnet")) == model_info("hardnet")
    pairs = torch.randint(0, 256, (6, 2, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    with torch.no_grad():
        want = foreign(torch.from_numpy(pairs[:, 0]).float().div(255).unsqueeze(1)).numpy()
    np.testing.assert_allclose(describe(foreign, pairs[:, 0]), want, atol=1e-5)
    d = pair_distances(foreign, pairs)
    np.testing.assert_allclose(d, np.linalg.norm(describe(foreign, pairs[:, 0]) - describe(foreign, pairs[:, 1]), axis=1), atol=1e-5)


def test_unknown_model_lists_the_registry():
    with pytest.raises(KeyError, match="hardnet"):
        create_model("nope")


# ---- configs/models/<arch>.yaml -------------------------------------------------------------------

CONFIG_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "models"
DOMAINS = {"grid", "choice", "uniform", "loguniform"}
# Where the training recipe departs from the paper's layout, which stays the class default (old
# checkpoints and create_model(name) keep it): MatchNet reads the shards' 32x32 patches as they are.
RECIPE_OVER_PAPER = {("matchnet", "input_size"): 32, ("siamese", "dropout"): 0.0,  # configs/models: the zoo searches
                     ("hardnet", "dropout"): 0.1}


@pytest.mark.parametrize("name", list_models())
def test_model_config_matches_the_code(name):
    import yaml

    if name in OPENCV_MODELS:
        pytest.skip("OpenCV baselines have no config: they are evaluated, never trained or swept")
    cfg = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    model_kwargs = dict(cfg["model"])
    assert model_kwargs.pop("arch") == name
    options = model_options(name)
    for key, value in model_kwargs.items():  # the YAML's defaults are the model's defaults
        assert key in options, f"{name}: model.{key}"
        assert options[key] == value or RECIPE_OVER_PAPER.get((name, key)) == value, f"{name}: model.{key}"
    assert cfg["loss"]["name"] == model_info(name).default_loss
    for key, domain in cfg["search_space"].items():
        section, _, field = key.partition(".")
        assert section in {"model", "loss", "train"} and field in cfg[section], f"{name}: {key} has no default"
        assert len(domain) == 1 and set(domain) <= DOMAINS, f"{name}: {key}"
    if model_info(name).trainable:
        assert {"lr", "lr_reference_batch", "batch_size", "momentum", "weight_decay"} <= set(cfg["train"])
