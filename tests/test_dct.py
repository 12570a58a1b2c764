import math

import pytest
import torch

from scalekd import Dct2d, dct_matrix, keep_dc, remove_dc, remove_dc_by_dct


@pytest.mark.parametrize('n', [1, 2, 5, 7, 14])
def test_dct_matrix_is_orthonormal(n):
    m = dct_matrix(n)
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_dct_matrix_matches_definition():
    # X_k = s_k * sum_i x_i cos(pi (2i+1) k / 2n), s_0 = sqrt(1/n), s_k = sqrt(2/n)
    n = 4
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    expected = [(math.sqrt(1 / n) if k == 0 else math.sqrt(2 / n))
                * sum(x[i].item() * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n)) for k in range(n)]
    torch.testing.assert_close(dct_matrix(n) @ x, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize('grid', [(7, 7), (14, 14), (14, 9), (3, 16), (1, 5)])
def test_phi_mean_subtraction_equals_dct_form(grid):
    x = torch.randn(3, 5, *grid, dtype=torch.float64)
    dct = Dct2d(*grid, dtype=torch.float64)
    by_dct = remove_dc_by_dct(x, dct)
    assert (remove_dc(x) - by_dct).abs().max().item() < 1e-10
    # and against the explicit per-channel spatial mean
    explicit = x - x.mean(dim=(2, 3), keepdim=True)
    assert (by_dct - explicit).abs().max().item() < 1e-10


def test_dct_inverse_roundtrip_and_energy():
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    dct = Dct2d(6, 10, dtype=torch.float64)
    coeffs = dct(x)
    torch.testing.assert_close(dct.inverse(coeffs), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(coeffs.pow(2).sum(), x.pow(2).sum())  # Parseval


def test_constant_map_has_all_energy_at_dc_and_cosine_at_its_frequency():
    h, w = 8, 6
    dct = Dct2d(h, w, dtype=torch.float64)
    const = torch.full((1, 1, h, w), 2.5, dtype=torch.float64)
    c = dct(const)
    assert c[0, 0, 0, 0].item() == pytest.approx(2.5 * math.sqrt(h * w))
    c[..., 0, 0] = 0
    assert c.abs().max().item() < 1e-12
    # a single DCT basis cosine with frequencies (2, 3)
    i = torch.arange(h, dtype=torch.float64).view(h, 1)
    j = torch.arange(w, dtype=torch.float64).view(1, w)
    cosine = torch.cos(math.pi * (2 * i + 1) * 2 / (2 * h)) * torch.cos(math.pi * (2 * j + 1) * 3 / (2 * w))
    c = dct(cosine.view(1, 1, h, w))
    peak = c.abs().flatten().argmax().item()
    assert divmod(peak, w) == (2, 3)
    c[..., 2, 3] = 0
    assert c.abs().max().item() < 1e-12


def test_keep_dc_and_phi_against_hand_computed_maps():
    # channel 0 (2 x 3): mean 2; channel 1: mean -1. Each channel's own mean, over H and W only.
    x = torch.tensor([[[[1., 2., 3.], [0., 2., 4.]],
                       [[-1., -1., -1.], [-4., 2., -1.]]]])
    want_dc = torch.tensor([[[[2., 2., 2.], [2., 2., 2.]],
                             [[-1., -1., -1.], [-1., -1., -1.]]]])
    want_phi = torch.tensor([[[[-1., 0., 1.], [-2., 0., 2.]],
                              [[0., 0., 0.], [-3., 3., 0.]]]])
    torch.testing.assert_close(keep_dc(x), want_dc, atol=0, rtol=0)
    torch.testing.assert_close(remove_dc(x), want_phi, atol=0, rtol=0)
    # a second image with other values leaves the first image's maps alone
    both = torch.cat([x, 10 * torch.ones_like(x)])
    torch.testing.assert_close(remove_dc(both)[:1], want_phi, atol=0, rtol=0)
    torch.testing.assert_close(keep_dc(both)[1:], 10 * torch.ones_like(x), atol=0, rtol=0)


def test_dct_rejects_wrong_grid():
    with pytest.raises(ValueError, match=r'\(4, 4\) grid'):
        Dct2d(4, 4)(torch.zeros(1, 1, 4, 5))
