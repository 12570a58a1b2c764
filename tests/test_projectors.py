import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scalekd import ConvProjector, CrossAttentionProjector, LinearProjector, build_distiller, build_projector
from scalekd.task.kernels import UnfoldConv2d, use_cpu_kernels
from scalekd.method.errors import OptionError
from tiny_models import IMG, make_student, make_teacher


def _make_identity_branches(cap: CrossAttentionProjector) -> None:
    """Student branch, query branch and attention projections as identities; FFN off."""
    c = cap.in_chs
    with torch.no_grad():
        for p in cap.parameters():
            p.zero_()
        cap.student_conv.weight[:, :, 1, 1] = torch.eye(c)
        cap.student_norm.weight.fill_(1.0)
        cap.student_norm.running_mean.zero_()
        cap.student_norm.running_var.fill_(1.0 - cap.student_norm.eps)
        cap.query_conv.weight[:, :, 0, 0] = torch.eye(cap.query_chs)
        cap.q.weight.copy_(torch.eye(cap.out_chs))
        cap.kv.weight.copy_(torch.cat([torch.eye(cap.out_chs), torch.eye(cap.out_chs)]))
        cap.proj.weight.copy_(torch.eye(cap.out_chs))
        cap.norm.weight.fill_(1.0)
    cap.eval()


def _layer_norm(v, eps=1e-5):
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    return [(a - mean) / math.sqrt(var + eps) for a in v]


def test_cap_hand_computed_attention_with_softmax_scale():
    cap = CrossAttentionProjector(3, 3, in_grid=(1, 2), out_grid=(1, 1), num_heads=1, query_chs=3)
    _make_identity_branches(cap)
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]).view(1, 3, 1, 2)  # tokens (1,0,0), (0,0,1)
    query = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    s = 5.0 / math.sqrt(3)  # softmax_scale * head_dim ** -0.5
    w1 = math.exp(s) / (math.exp(s) + 1.0)
    expected = _layer_norm([w1, 0.0, 1.0 - w1])
    out = cap(student, query)
    assert out.shape == (1, 3, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor(expected), atol=1e-5, rtol=0)


def test_cap_uniform_attention_averages_student_tokens_on_every_query():
    cap = CrossAttentionProjector(2, 2, in_grid=(2, 2), out_grid=(3, 1), num_heads=1)
    _make_identity_branches(cap)
    with torch.no_grad():
        cap.kv.weight[:2] = 0  # keys all zero -> uniform attention
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 4.0, 4.0, 4.0]]).view(1, 2, 2, 2)
    out = cap(x)
    expected = _layer_norm([2.5, 4.0])  # LayerNorm of the token mean
    assert out.shape == (1, 2, 3, 1)
    torch.testing.assert_close(out[0, :, :, 0].T, torch.tensor([expected] * 3), atol=1e-5, rtol=0)


def _reference_cap(cap: CrossAttentionProjector, x: torch.Tensor, queries=None) -> torch.Tensor:
    """CAP written from the spec with explicit matmul / softmax, separate k and v weights."""
    n, c_t, h = x.shape[0], cap.out_chs, cap.num_heads
    s = F.relu(cap.student_norm(cap.student_conv(x))) + cap.pos_embed
    s = s.flatten(2).transpose(1, 2)
    if queries is None:
        queries = cap.query_embed.T.reshape(1, cap.query_chs, *cap.out_grid).expand(n, -1, -1, -1)
    qt = F.relu(cap.query_conv(queries)).flatten(2).transpose(1, 2)
    wk, wv = cap.kv.weight[:c_t], cap.kv.weight[c_t:]
    bk, bv = cap.kv.bias[:c_t], cap.kv.bias[c_t:]
    q, k, v = qt @ cap.q.weight.T + cap.q.bias, s @ wk.T + bk, s @ wv.T + bv
    d = c_t // h
    outs = []
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) * d ** -0.5 * 5.0
        outs.append(torch.softmax(logits, dim=-1) @ v[..., sl])
    y = cap.norm(torch.cat(outs, dim=-1) @ cap.proj.weight.T + cap.proj.bias)
    y = y + cap.mlp.fc2(F.relu(cap.mlp.fc1(y)))
    return y.transpose(1, 2).reshape(n, c_t, *cap.out_grid)


@pytest.mark.parametrize('given_queries', [False, True])
def test_cap_matches_spec_reference(given_queries):
    torch.manual_seed(1)
    cap = CrossAttentionProjector(12, 16, in_grid=(5, 3), out_grid=(2, 4), num_heads=4,
                                  query_chs=6 if given_queries else None).double().eval()
    x = torch.randn(3, 12, 5, 3, dtype=torch.float64)
    q = torch.randn(3, 6, 2, 4, dtype=torch.float64) if given_queries else None
    torch.testing.assert_close(cap(x, q), _reference_cap(cap, x, q), atol=1e-10, rtol=0)


def test_cap_given_queries_get_the_gradient_of_its_output():
    """Queries given at call time (TPP's adaptive queries) stay in the graph: what made them is trained too."""
    cap = CrossAttentionProjector(4, 8, in_grid=(2, 2), out_grid=(3, 3), num_heads=2, query_chs=6)
    queries = torch.randn(2, 6, 3, 3, requires_grad=True)
    cap(torch.randn(2, 4, 2, 2), queries).square().sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0


def test_cap_learned_queries_are_a_normal_table_on_the_teacher_grid():
    cap = CrossAttentionProjector(8, 64, in_grid=(7, 7), out_grid=(14, 14), num_heads=8)
    assert cap.query_embed.shape == (196, 64)
    assert 0.9 < cap.query_embed.std().item() < 1.1
    assert cap.pos_embed.shape == (1, 8, 7, 7) and cap.pos_embed.std().item() < 0.03
    assert cap(torch.randn(2, 8, 7, 7)).shape == (2, 64, 14, 14)


def test_cap_layernorm_student_branch_for_convnext():
    cap = CrossAttentionProjector(8, 16, (4, 4), (2, 2), num_heads=2, student_norm='ln')
    assert not any(isinstance(m, nn.BatchNorm2d) for m in cap.modules())
    assert cap(torch.randn(2, 8, 4, 4)).shape == (2, 16, 2, 2)


@pytest.mark.parametrize('mlp_ratio, hidden', [(4.0, 640), (0.25, 40)])
def test_cap_parameters_counted_by_hand_with_its_ffn_width(mlp_ratio, hidden):
    """The demo ViT student's s4 CAP (96 channels on a 4x4 grid -> the teacher's 160): every weight
    counted layer by layer; the FFN's hidden width is ``mlp_ratio`` x 160."""
    cap = CrossAttentionProjector(96, 160, (4, 4), (4, 4), num_heads=8, mlp_ratio=mlp_ratio)
    student = 96 * 96 * 9 + 96 + 2 * 96 + 96 * 16            # 3x3 conv, BatchNorm, positional embedding
    queries = 16 * 160 + 160 * 160 + 160                      # learned table, 1x1 conv
    attention = (160 * 160 + 160) + (96 * 320 + 320) + (160 * 160 + 160) + 2 * 160  # q, kv, proj, LayerNorm
    ffn = 160 * hidden + hidden + hidden * 160 + 160
    assert sum(p.numel() for p in cap.parameters()) == student + queries + attention + ffn
    assert cap.mlp.fc1.out_features == hidden and cap(torch.randn(2, 96, 4, 4)).shape == (2, 160, 4, 4)


def test_cap_errors_name_the_problem():
    with pytest.raises(OptionError, match='num_heads=5 does not divide the teacher width 16'):
        CrossAttentionProjector(8, 16, (4, 4), (2, 2), num_heads=5)
    cap = CrossAttentionProjector(8, 16, (4, 4), (2, 2), num_heads=2)
    with pytest.raises(ValueError, match=r'expects \(N, 8, 4, 4\) maps, got \(2, 8, 5, 5\)'):
        cap(torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match='learns its queries'):
        cap(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2))
    adaptive = CrossAttentionProjector(8, 16, (4, 4), (2, 2), num_heads=2, query_chs=16)
    with pytest.raises(ValueError, match='none were given'):
        adaptive(torch.randn(2, 8, 4, 4))
    assert not hasattr(adaptive, 'query_embed')  # no unused parameter


def test_linear_projector_is_per_location_linear_then_resized():
    proj = LinearProjector(3, 5, (4, 4), (2, 2))
    x = torch.randn(2, 3, 4, 4)
    per_location = torch.einsum('oc,nchw->nohw', proj.proj.weight[:, :, 0, 0], x) + proj.proj.bias.view(1, 5, 1, 1)
    expected = F.interpolate(per_location, size=(2, 2), mode='bilinear', align_corners=False)
    torch.testing.assert_close(proj(x), expected)


def test_conv_projector_shapes_and_factory():
    assert ConvProjector(3, 5, (4, 4), (8, 8))(torch.randn(2, 3, 4, 4)).shape == (2, 5, 8, 8)
    assert isinstance(build_projector('cap', 4, 8, (2, 2), (2, 2), num_heads=2), CrossAttentionProjector)
    with pytest.raises(OptionError, match="unknown projector 'mlp'; choose one of cap, linear, conv"):
        build_projector('mlp', 4, 8, (2, 2), (2, 2))


def test_cpu_kernels_swap_the_full_cap_conv_and_keep_weights_keys_and_outputs():
    torch.manual_seed(0)
    caps = nn.ModuleList([CrossAttentionProjector(16, 8, (5, 5), (3, 3), num_heads=2),
                          CrossAttentionProjector(16, 8, (5, 5), (3, 3), num_heads=2, student_conv='separable')])
    assert type(caps[0].student_conv) is nn.Conv2d  # CAP itself is plain
    x = torch.randn(2, 16, 5, 5)
    before, keys, weight = [c(x) for c in caps], list(caps.state_dict()), caps[0].student_conv.weight
    assert use_cpu_kernels(caps) == 1
    assert isinstance(caps[0].student_conv, UnfoldConv2d) and caps[0].student_conv.weight is weight
    assert list(caps.state_dict()) == keys and type(caps[1].student_conv) is nn.Sequential
    for a, b in zip(before, [c(x) for c in caps]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('device', [None, torch.device('cpu')])
def test_a_distiller_built_on_the_cpu_takes_the_unfold_kernel(device):
    distiller = build_distiller(make_teacher('vit', IMG), make_student('resnet', IMG), img_size=IMG, device=device)
    assert sum(isinstance(m, UnfoldConv2d) for m in distiller.modules()) == 4  # proxy and s4 CAPs, ori and alt
