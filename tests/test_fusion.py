"vlm_lab.fusion beyond the cases 02b_fusion asserts: Flamingo widths, the vision gate, seeding and the bad-input matrix."
import pytest
import torch

from vlm_lab.fusion import GatedCrossAttentionBlock, VQAConfig, VQAModel, VisionGate, block_param_count, grow_fusion


def _batch(B=4, Nv=17, L=9, Dv=32, Dt=48, n_answers=22, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    return dict(vision=torch.randn(B, Nv, Dv, generator=g), text=torch.randn(B, L, Dt, generator=g), text_mask=mask,
                answer=torch.randint(0, n_answers, (B,), generator=g), qtype=torch.zeros(B, dtype=torch.long))


CFG = VQAConfig(vision_dim=32, text_dim=48, d_model=32, num_layers=2, heads=2, dim_head=16, n_answers=22)


def test_block_param_count_at_flamingo_width():
    "The closed form at the fusion-depth note's width (d=1024, 8 heads of 64, ff x4), counted on the meta device."
    with torch.device('meta'): blk = GatedCrossAttentionBlock(1024, 8, 64, 4)
    assert sum(p.numel() for p in blk.parameters()) == block_param_count(1024, 8, 64, 4) == 10_489_858


def test_vision_gate():
    g = VisionGate(8, init=1.5)
    assert g.gate_logit.shape == (8,)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(g(x), x * torch.sigmoid(torch.tensor(1.5)))
    assert VisionGate(8, init=0.0, per_channel=False).gate_logit.shape == (1,)


def test_same_seed_same_model_and_no_loss_without_answer():
    b = _batch()
    torch.manual_seed(3)
    a = VQAModel(CFG)(b)['logits']
    torch.manual_seed(3)
    m = VQAModel(CFG)
    assert torch.equal(a, m(b)['logits'])
    assert 'loss' not in m({k: v for k, v in b.items() if k != 'answer'})


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match='num_layers'): VQAConfig(num_layers=-1)
    with pytest.raises(ValueError, match='dropout'): VQAConfig(dropout=2.0)
    with pytest.raises(ValueError, match='vision_gate'): VQAConfig(vision_gate='yes')
    m, b = VQAModel(CFG), _batch()
    with pytest.raises(ValueError, match='answer'): m(dict(b, answer=torch.tensor([0, 1, 2, 99])))
    with pytest.raises(KeyError, match='vision'): m({k: v for k, v in b.items() if k != 'vision'})
    with pytest.raises(ValueError, match='vision_dim'): m(dict(b, vision=torch.randn(4, 17, 31)))
    with pytest.raises(ValueError, match='text_dim'): m(dict(b, text=torch.randn(4, 9, 47)))
    with pytest.raises(ValueError, match='config'): grow_fusion(m.state_dict(), 4)
