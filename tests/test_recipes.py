"""DINO's head and KoLeo in fp32 under autocast (issue #13)."""
import torch
import torch.nn.functional as F

import pretrain_dino
from models import DINOHead


# ----------------------------------------------------------------------------- DINO

def test_dino_head_and_koleo_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head, x = DINOHead(16, 4096, 32, 8), torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = head.mlp(x)
        logits = head(x)
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    ref = F.linear(F.normalize(hidden.float(), dim=-1), F.normalize(head.prototypes, dim=-1))
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(head(x), F.linear(F.normalize(head.mlp(x), dim=-1), F.normalize(head.prototypes, dim=-1)))
    feats = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pretrain_dino.koleo(feats)
    assert under.dtype == torch.float32 and torch.equal(under, pretrain_dino.koleo(feats))
