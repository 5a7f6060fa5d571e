"""vlm_lab.fusion beyond the cases 02b_fusion asserts: Flamingo widths, the vision gate, seeding, keyword-only options,
partial backbone unfreezing and the bad-input matrix."""
import pytest
import torch

from vlm_lab.backbones import tiny_text, tiny_vision
from vlm_lab.fusion import (CrossAttention, GatedCrossAttentionBlock, HookPoint, VQAConfig, VQAModel, VisionGate,
                            block_param_count, grow_fusion)
from vlm_lab.trainable import set_trainable


def _batch(B=4, Nv=17, L=9, Dv=32, Dt=48, n_answers=22, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    return dict(vision=torch.randn(B, Nv, Dv, generator=g), text=torch.randn(B, L, Dt, generator=g), text_mask=mask,
                answer=torch.randint(0, n_answers, (B,), generator=g), qtype=torch.zeros(B, dtype=torch.long))


CFG = VQAConfig(vision_dim=32, text_dim=48, d_model=32, num_layers=2, heads=2, dim_head=16, n_answers=22)


def test_block_param_count_at_flamingo_width():
    "The closed form at the fusion-depth note's width (d=1024, 8 heads of 64, ff x4), counted on the meta device."
    with torch.device('meta'): blk = GatedCrossAttentionBlock(1024, heads=8, dim_head=64, ff_mult=4)
    assert sum(p.numel() for p in blk.parameters()) == block_param_count(1024, heads=8, dim_head=64, ff_mult=4) \
        == 10_489_858


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


def test_options_are_keyword_only():
    "heads and dim_head are both ints: swapped positionally they would build another model without an error."
    with pytest.raises(TypeError): CrossAttention(32, 4, 8)
    with pytest.raises(TypeError): GatedCrossAttentionBlock(32, 4, 8)
    with pytest.raises(TypeError): block_param_count(32, 4, 8)
    with pytest.raises(TypeError): VQAModel(CFG).attach_backbones(None, None, False)


def test_hook_points_hold_no_state_and_mark_what_diagnostics_read():
    m = VQAModel(CFG)
    names = [n for n, mod in m.named_modules() if isinstance(mod, HookPoint)]
    assert {'hook_media', 'hook_fused', 'fusion.layers.1.hook_resid_post',
            'fusion.layers.0.attn.hook_attn'} <= set(names)
    assert len(names) == 2 + CFG.num_layers * (2 + 5)
    assert not any('hook' in k for k in m.state_dict())      # checkpoints (and flamingo-pytorch's) load unchanged


def test_partly_unfrozen_backbone_trains_and_leaves_train_mode_alone():
    "set_trainable unfreezes one text layer: that backbone trains (dropout, gradients), the frozen one stays in eval."
    vis, (txt, tok) = tiny_vision(seed=0), tiny_text(seed=0)
    m = VQAModel(VQAConfig(vision_dim=32, text_dim=32, d_model=32, heads=2, dim_head=16, n_answers=5))
    m.attach_backbones(vis, txt)
    rep = set_trainable(m, ['fusion.*', 'head.*', 'text_backbone.encoder.layer.1.*'])
    last = [n for n, p in m.named_parameters() if n.startswith('text_backbone.encoder.layer.1.')]
    assert rep.set_index('module').loc['text_backbone', 'trainable'].sum() == sum(
        p.numel() for n, p in m.named_parameters() if n in last)
    m.train()
    assert m.text_backbone.training and not m.vision_backbone.training
    enc = tok(['how many red circles', 'what colour is the square'], padding=True, return_tensors='pt')
    batch = dict(image=torch.rand(2, 3, 64, 64), input_ids=enc['input_ids'], attention_mask=enc['attention_mask'],
                 answer=torch.tensor([0, 1]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(('attn_gate', 'ff_gate')): p.fill_(0.5)
    m(batch)['loss'].backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n in last)
    assert all(p.grad is None for p in m.vision_backbone.parameters())
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith('text_backbone.encoder.layer.0.'))
    set_trainable(m, ['fusion.*', 'head.*'])                  # fully frozen again: back to eval mode
    m.train()
    assert not m.text_backbone.training
