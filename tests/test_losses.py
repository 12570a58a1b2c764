import math

import pytest
import torch

from scalekd import feature_distance, logit_kd_loss


def test_feature_distance_hand_computed():
    # one sample, 2 channels, 1x2 grid: location a: (3, 4) vs (4, 3); location b: (1, 0) vs (0, 2)
    s = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]])
    t = torch.tensor([[[[4.0, 0.0]], [[3.0, 2.0]]]])
    # a: (0.6, 0.8) vs (0.8, 0.6) -> 0.04 + 0.04; b: (1, 0) vs (0, 1) -> 2
    assert feature_distance(s, t).item() == pytest.approx(2.08)


def test_feature_distance_divides_by_batch_and_sums_over_space():
    s = torch.tensor([[[[1.0]], [[0.0]]], [[[0.0]], [[1.0]]]])  # N=2, C=2, 1x1
    t = torch.tensor([[[[0.0]], [[1.0]]], [[[0.0]], [[1.0]]]])
    assert feature_distance(s, t).item() == pytest.approx((2.0 + 0.0) / 2)
    # the same per-location mismatch on a 3x3 grid costs 9 times as much
    s9, t9 = s.expand(2, 2, 3, 3), t.expand(2, 2, 3, 3)
    assert feature_distance(s9, t9).item() == pytest.approx(9.0)


def test_feature_distance_is_scale_invariant_per_location():
    s = torch.randn(2, 8, 3, 3)
    t = torch.randn(2, 8, 3, 3)
    scale = torch.rand(2, 1, 3, 3) + 0.5
    torch.testing.assert_close(feature_distance(s * scale, t), feature_distance(s, t))


def test_feature_distance_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r'student \(1, 2, 3, 3\) and teacher \(1, 2, 4, 4\)'):
        feature_distance(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4))


def test_logit_kd_hand_computed():
    s = torch.tensor([[0.0, math.log(3.0)]])   # p_s = (1/4, 3/4)
    t = torch.tensor([[math.log(2.0), 0.0]])   # p_t = (2/3, 1/3)
    expected = -(2 / 3 * math.log(1 / 4) + 1 / 3 * math.log(3 / 4))
    assert logit_kd_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_logit_kd_temperature_and_batch_mean():
    s = torch.tensor([[0.0, 2 * math.log(3.0)], [0.0, 0.0]])
    t = torch.tensor([[2 * math.log(2.0), 0.0], [0.0, 0.0]])
    # T = 2 gives the distributions above for row 0; row 1 is uniform vs uniform: log 2
    row0 = -(2 / 3 * math.log(1 / 4) + 1 / 3 * math.log(3 / 4))
    expected = 4.0 * (row0 + math.log(2.0)) / 2
    assert logit_kd_loss(s, t, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
