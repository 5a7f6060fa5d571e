"""Tests of vlm_lab.diagnostics on constructed cases with known answers, beyond those 04_diagnostics asserts:
determinism, the loader helpers, copies in the text-only baseline, wider gradient cases, capture on any module."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlm_lab.diagnostics import (MappedLoader, blank_input, capture, capture_attention, collect, feature_diversity,
                                 gate_stats, gradient_ratio, gradient_report, hook_points, text_only_baseline,
                                 vision_dependency)
from vlm_lab.fusion import HookPoint


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


def toy_set(n=120, n_answers=6, source='vision', seed=0):
    g = torch.Generator().manual_seed(seed)
    answer = (torch.arange(n) % n_answers)[torch.randperm(n, generator=g)]
    vision, text = torch.randn(n, 3, 6, generator=g), torch.randn(n, 4, 6, generator=g)
    code = 3 * F.one_hot(answer, n_answers).float()[:, None, :6]
    if source == 'vision': vision = vision + code
    else: text = text + code
    return torch.utils.data.StackDataset(vision=vision, text=text, text_mask=torch.ones(n, 4, dtype=torch.bool),
                                         answer=answer, qtype=torch.arange(n) % 4)


def dl(ds, shuffle=False): return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=shuffle)


# ---------------------------------------------------------------- vision dependency
def test_vision_dependency_shuffle_is_whole_dataset_and_deterministic():
    ds = toy_set()
    v1 = vision_dependency(ReadVision(), dl(ds), modes=('shuffle', 'noise'), n_perm=3, seed=1)
    v2 = vision_dependency(ReadVision(), dl(ds), modes=('shuffle', 'noise'), n_perm=3, seed=1)
    pd.testing.assert_frame_equal(v1, v2)
    assert (v1.acc_ablated_sd >= 0).all()


def test_vision_dependency_options_are_keyword_only_and_groups_named_by_the_caller():
    with pytest.raises(TypeError): vision_dependency(ReadVision(), dl(toy_set()), ('blank',))
    vd = vision_dependency(ReadVision(), dl(toy_set()), modes='blank', qtype_names=['a', 'b', 'c', 'd'])
    assert vd.qtype.tolist() == ['all', 'a', 'b', 'c', 'd'] and (vd.n[1:] == 30).all()


# ---------------------------------------------------------------- prior and text-only baseline
def test_text_only_baseline():
    va = toy_set(60, source='vision', seed=1)
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


def test_gate_stats_beyond_the_notebook():
    gs = gate_stats(Gated()).set_index('name')
    assert len(gs) == 7 and gs.loc['layers.2.ff_gate', 'layer'] == 2 and gs.loc['layers.2.ff_gate', 'kind'] == 'tanh'
    assert len(gate_stats(nn.Linear(2, 2))) == 0
    raw = gate_stats(Gated(), activations={'ff_gate': 'identity'}).set_index('name')
    assert raw.loc['layers.1.ff_gate', 'mean'] == 2
    with pytest.raises(TypeError): gate_stats(Gated(), {'ff_gate': 'identity'})


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


# ---------------------------------------------------------------- attention and capture
class Attn(nn.Module):
    "One-head self-attention of any model of one's own, with its own hook points."
    def __init__(self):
        super().__init__(); self.hook_attn, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x):                                    # (B, L, d)
        a = self.hook_attn((x @ x.transpose(-1, -2)).softmax(-1)[:, None])  # (B, 1, L, L)
        return self.hook_resid_post(x + a[:, 0] @ x)


def test_capture_attention_on_any_module():
    m = nn.Sequential(Attn(), nn.Linear(4, 4), Attn())
    with capture_attention(m) as cap:
        m(torch.randn(2, 5, 4)); m(torch.randn(3, 5, 4))
    assert list(cap) == ['0.hook_attn', '2.hook_attn'] and cap.cat('0.hook_attn').shape == (5, 1, 5, 5)
    st = cap.stats()
    assert st.passes.tolist() == [2, 2] and (st.entropy <= st.max_entropy + 1e-9).all()
    m(torch.randn(2, 5, 4)); assert len(cap['0.hook_attn']) == 2        # hooks removed
    with capture_attention(m, ['2.hook_attn']) as cap:                  # exact names
        m(torch.randn(2, 5, 4))
    assert list(cap) == ['2.hook_attn']
    with pytest.raises(ValueError, match='Linear has no HookPoint'):
        with capture_attention(nn.Linear(2, 2)): pass


def test_capture_records_copies_and_per_layer_gradient_coverage():
    "The gradient recorded at each residual stream equals autograd's; a later in-place change does not alter a record."
    torch.manual_seed(0)
    m = nn.Sequential(Attn(), Attn(), Attn())
    x = torch.randn(2, 5, 4, requires_grad=True)
    with capture(m, '*.hook_resid_post', grad=True) as cap:
        mids = []
        h = m[1].hook_resid_post.register_forward_hook(lambda mod, i, o: mids.append(o))
        y = m(x)
        h.remove()
        g_ref, = torch.autograd.grad((y ** 2).sum(), mids[0], retain_graph=True)
        (y ** 2).sum().backward()
    assert list(cap.grads) == ['0.hook_resid_post', '1.hook_resid_post', '2.hook_resid_post']
    torch.testing.assert_close(cap.grads['1.hook_resid_post'][0], g_ref)
    torch.testing.assert_close(cap.grads['2.hook_resid_post'][0], 2 * y.detach())      # d(y^2)/dy at the output
    with torch.no_grad(): y.mul_(0)
    assert cap['2.hook_resid_post'][0].abs().sum() > 0                                  # a copy, not the live tensor
    with torch.no_grad(), capture(m, grad=True) as cap:                                 # no graph: nothing flows back
        m(x)
    assert sorted(cap) == sorted(hook_points(m)) and all(v == [] for v in cap.grads.values())
    with pytest.raises(ValueError, match=r"\['\*hook_q'\]"):
        with capture(m, ['*hook_attn', '*hook_q']): pass
