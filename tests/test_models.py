"""Our towers against kornia's reference implementations, given the same weights."""

import kornia.feature
import pytest
import torch

from pipeline.models import create_model, list_models


def test_hardnet_matches_kornia_given_same_weights():
    torch.manual_seed(0)
    ours = create_model("hardnet")
    # Move the BatchNorm running stats away from their init so the comparison covers them too.
    ours.train()
    with torch.no_grad():
        for _ in range(3):
            ours(torch.rand(64, 1, 32, 32))
    ours.eval()
    ref = kornia.feature.HardNet(pretrained=False)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.eval()
    x = torch.rand(32, 1, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_shapes_and_unit_norm(name):
    model = create_model(name).eval()
    x = torch.rand(5, 1, model.input_size, model.input_size)
    out = model(x)
    assert out.shape == (5, model.descriptor_dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expects patches of shape"):
        model(torch.rand(5, 3, model.input_size, model.input_size))


def test_unknown_model_lists_the_registry():
    with pytest.raises(KeyError, match="hardnet"):
        create_model("nope")
