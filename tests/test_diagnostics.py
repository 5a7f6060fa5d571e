"Tests of vlm_lab.diagnostics on constructed cases with known answers."
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlm_lab.diagnostics import (MappedLoader, attention_stats, blank_input, capture_attention, collect,
                                 disabled, feature_diversity, focus_ratio, gate_stats, gradient_ratio, gradient_report,
                                 layer_index, text_only_baseline, trainable_report, vision_dependency)


class Toy(nn.Module):
    def __init__(self, d_in=6, n_answers=6, use_vision=1.0, use_text=1.0, d=16):
        super().__init__()
        self.vision_proj, self.text_proj, self.head = nn.Linear(d_in, d), nn.Linear(d_in, d), nn.Linear(d, n_answers)
        self.use_vision, self.use_text = use_vision, use_text

    def forward(self, batch):
        v = self.vision_proj(batch['vision'].mean(1))
        t = self.text_proj(batch['text'].mean(1))
        logits = self.head(F.gelu(self.use_vision * v + self.use_text * t))
        out = {'logits': logits}
        if 'answer' in batch: out['loss'] = F.cross_entropy(logits, batch['answer'])
        return out


class ReadVision(nn.Module):
    def forward(self, b): return {'logits': b['vision'].mean(1)}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, **t): self.t = t; self.n = len(next(iter(t.values())))
    def __len__(self): return self.n
    def __getitem__(self, i): return {k: v[i] for k, v in self.t.items()}


def toy_set(n=120, n_answers=6, source='vision', seed=0):
    g = torch.Generator().manual_seed(seed)
    answer = (torch.arange(n) % n_answers)[torch.randperm(n, generator=g)]
    vision, text = torch.randn(n, 3, 6, generator=g), torch.randn(n, 4, 6, generator=g)
    code = 3 * F.one_hot(answer, n_answers).float()[:, None, :6]
    if source == 'vision': vision = vision + code
    else: text = text + code
    return DictDataset(vision=vision, text=text, text_mask=torch.ones(n, 4, dtype=torch.bool), answer=answer,
                       qtype=torch.arange(n) % 4)


def dl(ds, shuffle=False): return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=shuffle)


# ---------------------------------------------------------------- vision dependency
def test_model_ignoring_image_has_zero_drop():
    vd = vision_dependency(Toy(use_vision=0.0), dl(toy_set()), n_perm=2)
    assert set(vd['mode']) == {'blank', 'shuffle', 'noise'}
    assert (vd.drop_abs == 0).all() and (vd.acc_real == vd.acc_ablated).all()
    assert len(vd) == 3 * 5   # 'all' + 4 question types per mode


def test_model_reading_only_image_drops_exactly_as_computed():
    ds = toy_set()
    vd = vision_dependency(ReadVision(), dl(ds), modes=('blank', 'shuffle'), n_perm=1, seed=3)
    a = vd[vd.qtype == 'all'].set_index('mode')
    assert a.loc['blank', 'acc_real'] == 1.0
    assert a.loc['blank', 'acc_ablated'] == pytest.approx((ds.t['answer'] == 0).float().mean().item())
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(3))
    assert a.loc['shuffle', 'acc_ablated'] == pytest.approx((ds.t['answer'][perm] == ds.t['answer']).float().mean().item())
    assert a.loc['shuffle', 'drop_rel'] == pytest.approx(a.loc['shuffle', 'drop_abs'] / 1.0)


def test_vision_dependency_shuffle_is_whole_dataset_and_deterministic():
    ds = toy_set()
    v1 = vision_dependency(ReadVision(), dl(ds), modes=('shuffle', 'noise'), n_perm=3, seed=1)
    v2 = vision_dependency(ReadVision(), dl(ds), modes=('shuffle', 'noise'), n_perm=3, seed=1)
    pd.testing.assert_frame_equal(v1, v2)
    assert (v1.acc_ablated_sd >= 0).all()


def test_vision_dependency_errors():
    with pytest.raises(ValueError, match='cannot stand in'):
        vision_dependency(ReadVision(), dl(toy_set()), modes=('blank',), blank=torch.zeros(5, 6))
    with pytest.raises(KeyError, match="'image'"):
        vision_dependency(ReadVision(), dl(toy_set()), key='image')
    with pytest.raises(ValueError, match='modes'):
        vision_dependency(ReadVision(), dl(toy_set()), modes=('mean',))


# ---------------------------------------------------------------- prior and text-only baseline
def test_text_only_baseline():
    txt = text_only_baseline(dl(toy_set(source='text'), True), dl(toy_set(60, source='text', seed=1)), epochs=8, lr=1e-2)
    img = text_only_baseline(dl(toy_set(source='vision'), True), dl(toy_set(60, source='vision', seed=1)), epochs=8, lr=1e-2)
    assert txt['accuracy'] > img['accuracy'] + 0.3
    va = toy_set(60, source='vision', seed=1)
    abl = text_only_baseline(dl(toy_set(source='vision'), True), dl(va), model=lambda: Toy(use_text=0.0), epochs=2)
    assert abl['accuracy'] <= torch.bincount(va.t['answer']).max().item() / 60 + 1e-6
    given = Toy(); w = given.head.weight.detach().clone()
    text_only_baseline(dl(toy_set()), dl(va), model=given, epochs=1)
    assert torch.equal(given.head.weight, w)          # the given model is copied, not trained
    with pytest.raises(KeyError, match="'question_feats'"):
        text_only_baseline(dl(toy_set()), dl(va), text_key='question_feats')


def test_mapped_loader_and_collect():
    ld = MappedLoader(dl(toy_set()), blank_input('vision'))
    assert len(ld) == 8 and all((b['vision'] == 0).all() for b in ld)
    assert collect(ld, 'answer').shape == (120,)
    with pytest.raises(KeyError, match='nope'):
        collect(ld, 'nope')


# ---------------------------------------------------------------- gates, layers, trainable report
class Block(nn.Module):
    def __init__(self, a, f):
        super().__init__()
        self.attn_gate, self.ff_gate = nn.Parameter(torch.tensor([a])), nn.Parameter(torch.tensor([f]))
        self.lin = nn.Linear(3, 3)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Module(); self.gate.gate_logit = nn.Parameter(torch.tensor([0.0, math.log(3)]))
        self.layers = nn.ModuleList([Block(0.0, 0.5), Block(-1.0, 2.0), Block(0.3, 0.3)])
        self.head = nn.Sequential(nn.Linear(3, 2))


def test_gate_stats_known_values():
    gs = gate_stats(Gated()).set_index('name')
    assert len(gs) == 7 and pd.isna(gs.loc['gate.gate_logit', 'layer'])
    assert gs.loc['layers.2.ff_gate', 'layer'] == 2 and gs.loc['layers.2.ff_gate', 'kind'] == 'tanh'
    assert gs.loc['gate.gate_logit', 'mean'] == pytest.approx(0.625)
    assert gs.loc['layers.1.attn_gate', 'mean'] == pytest.approx(math.tanh(-1))
    assert gs.loc['layers.1.attn_gate', 'abs_mean'] == pytest.approx(math.tanh(1))
    assert gs.loc['layers.0.attn_gate', 'mean'] == 0.0
    assert len(gate_stats(nn.Linear(2, 2))) == 0


def test_layer_index():
    m = Gated()
    assert layer_index(m, 'layers.1.lin.weight') == 1 and layer_index(m, 'head.0.weight') is None
    assert layer_index(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), '1.weight') == 1   # no ModuleList: first integer


def test_trainable_report():
    m = Gated(); m.layers[0].requires_grad_(False)
    tr = trainable_report(m)
    per_layer = tr[tr.module == 'layers'].set_index('layer')
    assert per_layer.total.tolist() == [14, 14, 14] and per_layer.trainable.tolist() == [0, 14, 14]
    tot = tr[tr.module == 'total'].iloc[0]
    assert tot.total == sum(p.numel() for p in m.parameters()) and tot.trainable == tot.total - 14


# ---------------------------------------------------------------- feature diversity
def test_feature_diversity_known_cases():
    same = torch.randn(1, 1, 8).expand(6, 4, 8)
    d = feature_diversity(same)
    assert d['images'] == pytest.approx(0, abs=1e-12) and d['patches'] == pytest.approx(0, abs=1e-12)
    eye = torch.eye(12)
    orth = torch.stack([eye[3 * i:3 * i + 3] for i in range(4)])
    d = feature_diversity(orth)
    assert d['images'] == pytest.approx(1) and d['patches'] == pytest.approx(1)
    assert math.isnan(feature_diversity(torch.randn(5, 8))['patches'])
    ld = dl(toy_set())
    assert feature_diversity(ld)['n_images'] == 120
    with pytest.raises(ValueError, match='at least 2'):
        feature_diversity(torch.randn(1, 3, 4))


def test_feature_diversity_matches_brute_force():
    x = torch.randn(7, 5, 4)
    u = F.normalize(x.double(), dim=-1)
    bf = np.mean([1 - np.mean([(u[i, a] @ u[i, b]).item() for a in range(5) for b in range(5) if a != b]) for i in range(7)])
    p = F.normalize(x.double().mean(1), dim=-1)
    bfi = 1 - np.mean([(p[i] @ p[j]).item() for i in range(7) for j in range(7) if i != j])
    d = feature_diversity(x)
    assert d['patches'] == pytest.approx(bf, abs=1e-10) and d['images'] == pytest.approx(bfi, abs=1e-10)


# ---------------------------------------------------------------- gradients
class TwoBranch(nn.Module):
    def __init__(self, a=1.0, b=2.0):
        super().__init__()
        self.adapter, self.branch = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        with torch.no_grad(): self.adapter.weight.fill_(a); self.branch.weight.fill_(b)

    def forward(self, batch):
        y = self.adapter(batch['x']) + self.branch(batch['x'])
        return {'logits': y, 'loss': 0.5 * (y - batch['t']).pow(2).mean()}


@pytest.mark.parametrize('a,b', [(1.0, 2.0), (0.5, -0.25), (2.0, 0.1)])
def test_gradient_ratio_closed_form(a, b):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 1, generator=g), torch.randn(16, 1, generator=g)
    m = TwoBranch(a, b)
    expected = abs((((a + b) * x - t) * x).sum().item()) / abs(((a * x - t) * x).sum().item())
    assert gradient_ratio(m, {'x': x, 't': t}, 'adapter', 'branch') == pytest.approx(expected, rel=1e-5)
    assert gradient_ratio(m, {'x': x, 't': t}, m.adapter, m.branch) == pytest.approx(expected, rel=1e-5)


def test_gradient_report_groups_and_no_side_effects():
    m = TwoBranch()
    batch = {'x': torch.ones(4, 1), 't': torch.zeros(4, 1)}
    r = gradient_report(m, batch)
    assert r.group.tolist() == ['adapter', 'branch'] and r.norm.tolist() == pytest.approx([3.0, 3.0])
    assert r.share.sum() == pytest.approx(1.0) and r.attrs['total_norm'] == pytest.approx(math.sqrt(18))
    assert m.adapter.weight.grad is None
    r = gradient_report(m, batch, groups={'both': ''})
    assert r.share.iloc[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match='matches no trainable'):
        gradient_report(m, batch, groups={'x': 'nothing'})


def test_disabled_zeroes_output_and_restores():
    m = TwoBranch()
    x = {'x': torch.ones(2, 1), 't': torch.zeros(2, 1)}
    with disabled(m.branch):
        assert m(x)['logits'].detach().tolist() == [[1.0], [1.0]]
    assert m(x)['logits'].detach().tolist() == [[3.0], [3.0]]


# ---------------------------------------------------------------- attention
def test_attention_stats_known_cases():
    n = 16                                                   # 1/16 is exact in float32
    u = torch.full((3, 2, 4, n), 1 / n)
    s = attention_stats(u)
    assert s['entropy'] == pytest.approx(math.log(n), abs=1e-12) and s['max_entropy'] == pytest.approx(math.log(n))
    assert s['max_attention'] == pytest.approx(1 / n) and s['norm_entropy'] == pytest.approx(1.0)
    oh = F.one_hot(torch.randint(0, n, (3, 2, 4)), n).float()
    assert attention_stats(oh)['entropy'] == 0.0 and attention_stats(oh)['max_attention'] == 1.0
    assert focus_ratio(oh, u) == pytest.approx(n)
    with pytest.raises(ValueError, match='summing to 1'):
        attention_stats(torch.randn(2, 5))


class Attn(nn.Module):
    def __init__(self):
        super().__init__(); self.store_attention, self.last_attention = False, None

    def forward(self, x):                                    # (B, L, d) self-attention, one head
        a = (x @ x.transpose(-1, -2)).softmax(-1)[:, None]  # (B, 1, L, L)
        if self.store_attention: self.last_attention = a
        return x + a[:, 0] @ x


def test_capture_attention():
    m = nn.Sequential(Attn(), nn.Linear(4, 4), Attn())
    m[2].store_attention = True
    with capture_attention(m) as cap:
        m(torch.randn(2, 5, 4)); m(torch.randn(3, 5, 4))
    assert list(cap) == ['0', '2'] and cap.cat('0').shape == (5, 1, 5, 5)
    assert m[0].store_attention is False and m[2].store_attention is True
    st = cap.stats()
    assert st.passes.tolist() == [2, 2] and (st.entropy <= st.max_entropy + 1e-9).all()
    m(torch.randn(2, 5, 4)); assert len(cap['0']) == 2        # hooks removed
    with pytest.raises(ValueError, match='store_attention'):
        with capture_attention(nn.Linear(2, 2)): pass
