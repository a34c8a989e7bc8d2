import pytest
import torch

import common
from models import CrossDomainCNN, build_backbone


def test_step_schedule():
    s = common.step_schedule(0.03, 10)
    assert s.tolist() == pytest.approx([0.03] * 6 + [0.003] * 2 + [0.0003] * 2)


def test_cross_domain_cnn_is_per_domain_then_shared_at_full_resolution():
    torch.manual_seed(0)
    m = CrossDomainCNN({"a": 6, "b": 9}, width=8, depth=2).eval()
    xa, xb = torch.randn(2, 6, 11, 11), torch.randn(1, 9, 11, 11)
    both = m([xa, xb], ["a", "b"])
    assert both.shape == (3, 8, 11, 11)
    torch.testing.assert_close(both[:2], m(xa, "a"))
    x2 = xa.clone()
    x2[0, :, 5, 5] += 3  # a pixel reaches exactly its 5x5 neighbourhood
    changed = (m(x2, "a") - m(xa, "a")).abs().sum(1)[0] > 0
    assert changed[3:8, 3:8].all() and changed.sum() == 25
    with pytest.raises(ValueError, match="domains a, b: say which one"):
        m(xa)
    with pytest.raises(ValueError, match="no domain 'c'"):
        m(xa, "c")
    with pytest.raises(ValueError, match="domain 'b' has 9 bands, got an input with 6"):
        m(xa, "b")
    with pytest.raises(ValueError, match="in_chans = {domain name: band count}"):
        build_backbone("cdcnn", in_chans=6)
