"Tests of vlm_lab.models: gated cross-attention, the VQA model, backbones and the feature cache (tiny configs, seconds)."
import json, warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm_lab.models import (CACHE_FORMAT, FEATURE_CACHE_LOG, CrossAttention, FeatureDataset, FusionStack,
                            GatedCrossAttentionBlock, ShapesViTHead, VQAConfig, VQAModel, VisionGate, backbone_id,
                            block_param_count, evaluate_shapes_vit, feature_dataset, grow_fusion, load_shapes_vit_head,
                            load_text, load_vision, masked_mean, pretrain_shapes_vit, scene_targets, text_features,
                            tiny_text, tiny_vision, vision_features, vqa_param_count)
from vlm_lab.data import ShapesVQA, VQACollator


def _open_gates(model, value=0.5):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('attn_gate', 'ff_gate')): p.fill_(value)
    return model


def _batch(B=4, Nv=17, L=9, Dv=32, Dt=48, n_answers=22, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool); mask[0, 4:] = False
    return dict(vision=torch.randn(B, Nv, Dv, generator=g), text=torch.randn(B, L, Dt, generator=g), text_mask=mask,
                answer=torch.randint(0, n_answers, (B,), generator=g), qtype=torch.zeros(B, dtype=torch.long))


CFG = VQAConfig(vision_dim=32, text_dim=48, d_model=32, num_layers=2, heads=2, dim_head=16, n_answers=22)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('VLM_LAB_CACHE', str(tmp_path / 'cache'))
    FEATURE_CACHE_LOG.clear()
    return tmp_path / 'cache'


# -- fusion mechanism ------------------------------------------------------------------------------------------------

def test_block_is_identity_at_init():
    torch.manual_seed(0)
    blk = GatedCrossAttentionBlock(32, heads=4, dim_head=8)
    x, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    assert torch.equal(blk(x, v), x)
    assert blk.attn_gate.item() == 0 and blk.ff_gate.item() == 0


@pytest.mark.parametrize('d,h,dh,m', [(32, 2, 16, 4), (64, 4, 16, 2), (96, 3, 24, 1.5), (1024, 8, 64, 4)])
def test_block_param_count_closed_form(d, h, dh, m):
    blk = GatedCrossAttentionBlock(d, h, dh, m)
    assert sum(p.numel() for p in blk.parameters()) == block_param_count(d, h, dh, m) == 4 * d + 4 * d * h * dh + 2 * d * int(m * d) + 2


@pytest.mark.parametrize('seed', [0, 1])
def test_parity_with_flamingo_pytorch(seed):
    from flamingo_pytorch import GatedCrossAttentionBlock as Ref
    torch.manual_seed(seed)
    ref = Ref(dim=64, dim_head=16, heads=4, ff_mult=4)
    with torch.no_grad(): ref.attn_gate.fill_(0.9); ref.ff_gate.fill_(-0.5)
    ours = GatedCrossAttentionBlock(64, heads=4, dim_head=16, ff_mult=4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, media = torch.randn(3, 8, 64), torch.randn(3, 20, 64)
    with torch.no_grad(): a, b = ref(x, media[:, None]), ours(x, media)
    assert (a - b).abs().max().item() < 1e-5
    assert (a - x).abs().max().item() > 1e-3


def test_store_attention_matches_sdpa_and_masks():
    torch.manual_seed(0)
    att = CrossAttention(32, heads=4, dim_head=8)
    x, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    m = torch.ones(2, 7, dtype=torch.bool); m[:, 5:] = False
    y_sdpa = att(x, v, m)
    assert att.last_attention is None
    att.store_attention = True
    y_exp = att(x, v, m)
    torch.testing.assert_close(y_sdpa, y_exp, atol=1e-5, rtol=1e-5)
    p = att.last_attention
    assert p.shape == (2, 4, 5, 7) and p[..., 5:].abs().max() == 0
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 5))


def test_vision_gate():
    g = VisionGate(8, init=1.5)
    assert g.gate_logit.shape == (8,)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(g(x), x * torch.sigmoid(torch.tensor(1.5)))
    assert VisionGate(8, init=0.0, per_channel=False).gate_logit.shape == (1,)


def test_vqa_model_forward_loss_gates_and_params():
    torch.manual_seed(0)
    m = VQAModel(CFG)
    b = _batch()
    out = m(b)
    assert out['logits'].shape == (4, 22) and out['loss'].shape == ()
    torch.testing.assert_close(out['loss'], F.cross_entropy(out['logits'], b['answer']))
    # identity at init: logits = head(masked mean of projected text)
    torch.testing.assert_close(out['logits'], m.head(masked_mean(m.text_proj(b['text']), b['text_mask'])))
    gates = m.gates()
    assert sorted(k.rsplit('.', 1)[-1] for k in gates) == ['attn_gate', 'attn_gate', 'ff_gate', 'ff_gate', 'gate_logit']
    assert sum(p.numel() for p in m.parameters()) == vqa_param_count(CFG)
    no_answer = {k: v for k, v in b.items() if k != 'answer'}
    assert 'loss' not in m(no_answer)


def test_vqa_model_attention_on_request_same_logits():
    torch.manual_seed(0)
    m = _open_gates(VQAModel(CFG))
    b = _batch()
    o1, o2 = m(b), m(b, return_attention=True)
    torch.testing.assert_close(o1['logits'], o2['logits'], atol=1e-5, rtol=1e-5)
    assert [a.shape for a in o2['attention']] == [(4, 2, 9, 17)] * 2
    assert not any(a.store_attention for a in m.attention_modules())


def test_same_seed_same_model():
    b = _batch()
    torch.manual_seed(3); a = _open_gates(VQAModel(CFG))(b)['logits']
    torch.manual_seed(3); c = _open_gates(VQAModel(CFG))(b)['logits']
    assert torch.equal(a, c)


def test_grow_fusion_warm_start_is_identity():
    torch.manual_seed(1)
    small = _open_gates(VQAModel(CFG), 0.3)
    b = _batch()
    for big in (grow_fusion(small, 4), grow_fusion(small.state_dict(), 4, CFG)):
        assert len(big.fusion.layers) == 4
        torch.testing.assert_close(big(b)['logits'], small(b)['logits'])
    big = VQAModel(CFG, num_layers=4)
    res = big.load_state_dict(small.state_dict(), strict=False)
    assert res.unexpected_keys == [] and all(k.startswith(('fusion.layers.2.', 'fusion.layers.3.')) for k in res.missing_keys)
    torch.testing.assert_close(big(b)['logits'], small(b)['logits'])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match='num_layers'): VQAConfig(num_layers=-1)
    with pytest.raises(ValueError, match='dropout'): VQAConfig(dropout=2.0)
    with pytest.raises(ValueError, match='vision_gate'): VQAConfig(vision_gate='yes')
    m = VQAModel(CFG); b = _batch()
    with pytest.raises(ValueError, match='answer'): m(dict(b, answer=torch.tensor([0, 1, 2, 99])))
    with pytest.raises(ValueError, match='attach_backbones'):
        m({**{k: v for k, v in b.items() if k != 'vision'}, 'image': torch.rand(4, 3, 64, 64)})
    with pytest.raises(KeyError, match='vision'): m({k: v for k, v in b.items() if k != 'vision'})
    with pytest.raises(ValueError, match='vision_dim'): m(dict(b, vision=torch.randn(4, 17, 31)))
    with pytest.raises(ValueError, match='num_layers'): grow_fusion(m, 1)
    with pytest.raises(FileNotFoundError, match='/no/such'): load_vision('/no/such')
    with pytest.raises(FileNotFoundError, match='/no/such'): load_text('/no/such')


# -- backbones -------------------------------------------------------------------------------------------------------

def test_shapes_vit_asset_loads():
    vit = load_vision('shapes-vit')
    assert vit.hidden_size == 128 and vit.image_size == 64 and vit.config.patch_size == 8
    with torch.no_grad(): out = vit(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 65, 128) and torch.isfinite(out).all()
    assert next(vit.parameters()).dtype == torch.float32
    head = load_shapes_vit_head()
    m = evaluate_shapes_vit(vit, head, n_scenes=16)
    assert set(m) >= {'cell_acc', 'shape_acc', 'color_acc', 'count_acc'} and all(0 <= m[k] <= 1 for k in ('cell_acc', 'shape_acc'))


def test_local_folders_use_the_same_path(tmp_path):
    tv = tiny_vision(seed=2)
    tv.backbone.save_pretrained(tmp_path / 'vit')
    (tmp_path / 'vit' / 'preprocessor_config.json').write_text(json.dumps(dict(image_mean=[.5] * 3, image_std=[.5] * 3, crop_size=dict(height=64, width=64))))
    lv = load_vision(tmp_path / 'vit')
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(): torch.testing.assert_close(lv(x), tv(x))
    assert backbone_id(lv) == backbone_id(tv)


def test_pretraining_runs_and_is_deterministic():
    kw = dict(n_scenes=32, epochs=1, batch_size=16, width=32, layers=1, heads=2, seed=5)
    e1, h1, log = pretrain_shapes_vit(**kw)
    e2, h2, _ = pretrain_shapes_vit(**kw)
    assert len(log['epoch_loss']) == 1
    assert all(torch.equal(a, b) for a, b in zip(e1.state_dict().values(), e2.state_dict().values()))
    assert backbone_id(e1) == backbone_id(e2)
    t = scene_targets([dict(objects=[dict(shape='circle', color='red', row=0, col=0)])])
    assert t['color'][0, 0] == 1 and t['shape'][0, 0] == 0 and t['shape'][0, 1] == -100 and t['count'][0] == 0
    out = ShapesViTHead(32)(torch.randn(2, 17, 32))
    assert out['color'].shape == (2, 9, 5) and out['shape'].shape == (2, 9, 4)


# -- feature cache ---------------------------------------------------------------------------------------------------

def test_text_features_unique_and_index(tmp_cache):
    tm, tok = tiny_text()
    qs = ['a red circle?', 'a blue square?', 'a red circle?', 'a red circle?', 'what?']
    f, m, idx = text_features(tm, tok, qs)
    assert f.shape[0] == 3 and m.shape == f.shape[:2] and m.dtype == torch.bool
    assert idx.tolist() == [0, 1, 0, 0, 2]
    f2, m2, idx2 = text_features(tm, tok, qs)
    assert torch.equal(f, f2) and [e['status'] for e in FEATURE_CACHE_LOG] == ['built', 'hit']


def test_feature_cache_hit_and_rebuild(tmp_cache):
    from safetensors.torch import save, load
    ds = ShapesVQA(n=24, seed=4)
    vis = tiny_vision(); tm, tok = tiny_text()
    f1 = feature_dataset(ds, vis, tm, tok, batch_size=8)
    f2 = feature_dataset(ds, vis, tm, tok, batch_size=8)
    assert [e['status'] for e in FEATURE_CACHE_LOG] == ['built', 'built', 'hit', 'hit']
    assert torch.equal(f1.vision, f2.vision) and f1.vision.shape == (24, 17, 32)
    path = Path(FEATURE_CACHE_LOG[0]['path'])
    assert path.parent == tmp_cache / 'features'
    good = load(path.read_bytes())
    # corrupt file
    path.write_bytes(b'garbage')
    with pytest.warns(UserWarning, match='stale or corrupt'): v = vision_features(vis, ds)
    assert torch.equal(v, f1.vision) and FEATURE_CACHE_LOG[-1]['status'].startswith('rebuilt: unreadable')
    # key mismatch recorded in the metadata
    path.write_bytes(save(good, metadata={'format': CACHE_FORMAT, 'kind': 'vision', 'backbone': 'other'}))
    with pytest.warns(UserWarning): vision_features(vis, ds)
    assert FEATURE_CACHE_LOG[-1]['status'].startswith('rebuilt: metadata backbone')
    # a different backbone never reads this entry
    FEATURE_CACHE_LOG.clear(); vision_features(tiny_vision(seed=1), ds)
    assert FEATURE_CACHE_LOG[-1]['status'] == 'built'
    # a different dataset neither
    FEATURE_CACHE_LOG.clear(); vision_features(vis, ShapesVQA(n=24, seed=5))
    assert FEATURE_CACHE_LOG[-1]['status'] == 'built'


def test_feature_dataset_batches_and_loader(tmp_cache):
    ds = ShapesVQA(n=20, seed=1)
    vis = tiny_vision(); tm, tok = tiny_text()
    fd = feature_dataset(ds, vis, tm, tok)
    b = next(fd.batches(8))
    assert sorted(b) == ['answer', 'index', 'qtype', 'text', 'text_mask', 'vision']
    assert b['vision'].shape == (8, 17, 32) and b['text_mask'].dtype == torch.bool and b['answer'].dtype == torch.long
    dl = next(iter(torch.utils.data.DataLoader(fd, batch_size=8)))
    assert all(torch.equal(dl[k], b[k]) for k in b)
    assert [int(x) for x in b['answer']] == [ds.answer_ids[ds.records[i]['answer']] for i in range(8)]
    s1 = [x['index'].tolist() for x in fd.batches(8, shuffle=True, seed=3)]
    s2 = [x['index'].tolist() for x in fd.batches(8, shuffle=True, seed=3)]
    assert s1 == s2 and sorted(sum(s1, [])) == list(range(20))
    assert len(fd.subset([0, 2, 4])) == 3
    with pytest.raises(ValueError, match='text_index'):
        FeatureDataset(fd.vision, fd.text, fd.text_mask, fd.text_index[:3], fd.answer, fd.qtype)


def test_cached_and_raw_paths_agree(tmp_cache):
    ds = ShapesVQA(n=8, seed=2)
    vis = tiny_vision(); tm, tok = tiny_text()
    fd = feature_dataset(ds, vis, tm, tok)
    torch.manual_seed(0)
    m = _open_gates(VQAModel(VQAConfig(vision_dim=32, text_dim=32, d_model=32, heads=2, dim_head=16)))
    cached = m(next(fd.batches(8)))['logits']
    m.attach_backbones(vis, tm)
    raw = m(VQACollator(tok)([ds[i] for i in range(8)]))['logits']
    torch.testing.assert_close(raw, cached, atol=1e-4, rtol=1e-4)
    m.train()
    assert m.training and not m.text_backbone.training and not m.vision_backbone.training
