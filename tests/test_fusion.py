"""Fusion variants: formulas on known inputs, gradients to both branches, the gated-attention fix."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.fusion import FUSIONS, make_fusion

DIM = 16


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_shape_and_gradients(name):
    torch.manual_seed(0)
    fusion = make_fusion(name, DIM, heads=3)
    a, b = torch.randn(5, DIM, requires_grad=True), torch.randn(5, DIM, requires_grad=True)
    g = fusion(a, b)
    assert g.shape == (5, DIM)
    g.square().sum().backward()
    assert a.grad.abs().sum() > 0
    if name == "scene_only":
        assert b.grad is None  # ignores the person branch entirely
        assert torch.equal(g, a)
    else:
        assert b.grad.abs().sum() > 0
        assert all(p.grad is not None for p in fusion.parameters() if p.requires_grad)


def test_sum_ln_elu_formula():
    torch.manual_seed(0)
    f = make_fusion("sum_ln_elu", DIM)
    a, b = torch.randn(4, DIM), torch.randn(4, DIM)
    ln = lambda x: F.layer_norm(x, (DIM,), f.norm.weight, f.norm.bias)  # noqa: E731
    assert torch.allclose(f(a, b), F.elu((ln(a) + ln(b)) @ f.linear.weight.T + f.linear.bias), atol=1e-6)


def test_weighted_sum_formula():
    torch.manual_seed(0)
    f = make_fusion("weighted_sum", DIM)
    torch.nn.init.normal_(f.alpha), torch.nn.init.normal_(f.beta)
    a, b = torch.randn(4, DIM), torch.randn(4, DIM)
    mixed = sum(f.alpha[h] * a + f.beta[h] * b for h in range(3))
    assert torch.allclose(f(a, b), F.layer_norm(mixed, (DIM,), f.norm.weight, f.norm.bias) + f.bias, atol=1e-6)


def test_gated_attention_weights_depend_on_inputs():
    """The reference's softmax over a size-1 axis made every weight 1; ours is a softmax across a and b."""
    torch.manual_seed(0)
    f = make_fusion("gated_attention", DIM, heads=3)
    a, b = torch.randn(6, DIM), torch.randn(6, DIM)
    w = f.gate_weights(a, b)
    assert w.shape == (6, 3, 2)
    assert torch.allclose(w.sum(-1), torch.ones(6, 3))
    assert (w < 0.999).all() and w[:, :, 0].std(dim=0).min() > 1e-3  # weights vary across samples
    expected = F.silu(w[..., 0].sum(1, keepdim=True) * a + w[..., 1].sum(1, keepdim=True) * b) + f.bias
    assert torch.allclose(f(a, b), expected, atol=1e-6)
    # a scene that scores far higher than the person takes (almost) all the weight
    with torch.no_grad():
        f.score_a.weight.zero_(), f.score_b.weight.zero_(), f.score_a.bias.fill_(20.0), f.score_b.bias.zero_()
    assert torch.allclose(f.gate_weights(a, b)[..., 0], torch.ones(6, 3), atol=1e-6)


def test_mlp_glu_formula():
    torch.manual_seed(0)
    f = make_fusion("mlp_glu", DIM, heads=2)
    a, b = torch.randn(3, DIM), torch.randn(3, DIM)
    heads = []
    for h in range(2):
        wa = F.linear(a, f.attn_a.weight[h * DIM:(h + 1) * DIM], f.attn_a.bias[h * DIM:(h + 1) * DIM]).softmax(-1)
        wb = F.linear(b, f.attn_b.weight[h * DIM:(h + 1) * DIM], f.attn_b.bias[h * DIM:(h + 1) * DIM]).softmax(-1)
        heads.append(wa * a + wb * b)
    m = f.mlp(torch.cat(heads, dim=1))
    assert torch.allclose(f(a, b), F.relu(m * torch.sigmoid(f.gate(m))) + f.bias, atol=1e-6)


def test_bilinear_residual_starts_as_sum():
    f = make_fusion("bilinear_residual", DIM)
    a, b = torch.randn(3, DIM), torch.randn(3, DIM)
    assert torch.allclose(f(a, b), a + b)


def test_unknown_fusion():
    with pytest.raises(ValueError, match="unknown fusion 'concat'; choose one of sum_ln_elu, weighted_sum"):
        make_fusion("concat", DIM)
