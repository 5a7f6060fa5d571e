"Tests of vlm_lab.train: parameter groups, schedule, determinism, accumulation, resume, divergence, early stopping."
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlm_lab.train import (CHECKPOINT_NAME, TIMING_COLUMNS, decay_split, evaluate, fit, load_checkpoint,
                           param_groups, predict, resolve_precision, save_checkpoint)


class ToyVQA(nn.Module):
    "Pooled vision + pooled text -> MLP head; follows the lab's batch convention."
    def __init__(self, dv=8, dt=8, d=16, n_answers=5, dropout=0.0):
        super().__init__()
        self.vision_proj, self.text_proj = nn.Linear(dv, d), nn.Linear(dt, d)
        self.norm, self.drop, self.head = nn.LayerNorm(d), nn.Dropout(dropout), nn.Linear(d, n_answers)
        self.gate_logit = nn.Parameter(torch.tensor(1.5))

    def forward(self, batch):
        v = self.vision_proj(batch['vision'].mean(1))
        m = batch['text_mask'].unsqueeze(-1).float()
        t = self.text_proj((batch['text'] * m).sum(1) / m.sum(1).clamp(min=1))
        logits = self.head(self.drop(F.gelu(self.norm(torch.sigmoid(self.gate_logit) * v + t))))
        out = {'logits': logits}
        if 'answer' in batch: out['loss'] = F.cross_entropy(logits, batch['answer'])
        return out


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, **t): self.t = t; self.n = len(next(iter(t.values())))
    def __len__(self): return self.n
    def __getitem__(self, i): return {k: v[i] for k, v in self.t.items()}


def toy_data(n=128, nv=4, dv=8, L=5, dt=8, n_answers=5, seed=0):
    g, gt = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(12345)
    vision, text = torch.randn(n, nv, dv, generator=g), torch.randn(n, L, dt, generator=g)
    mask = torch.ones(n, L, dtype=torch.bool)
    wv, wt = torch.randn(dv, n_answers, generator=gt), torch.randn(dt, n_answers, generator=gt)
    answer = (vision.mean(1) @ wv + 0.5 * text.mean(1) @ wt).argmax(-1)
    return DictDataset(vision=vision, text=text, text_mask=mask, answer=answer, qtype=torch.arange(n) % 4)


def loaders(n=128, bs=16, seed=0):
    return (torch.utils.data.DataLoader(toy_data(n, seed=seed), batch_size=bs, shuffle=True),
            torch.utils.data.DataLoader(toy_data(n // 2, seed=seed + 100), batch_size=bs))


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def no_timing(df):
    return df.drop(columns=list(TIMING_COLUMNS))


def test_decay_split_and_groups():
    m = ToyVQA()
    decay, no_decay = decay_split(m)
    assert sorted(decay) == ['head.weight', 'text_proj.weight', 'vision_proj.weight']
    assert 'gate_logit' in no_decay and 'norm.weight' in no_decay and 'head.bias' in no_decay
    groups = param_groups(m, 0.2)
    assert [g['weight_decay'] for g in groups] == [0.2, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]['params']) and all(p.ndim < 2 for p in groups[1]['params'])
    m.vision_proj.requires_grad_(False)
    assert sum(len(g['params']) for g in param_groups(m)) == len(list(m.parameters())) - 2
    with pytest.raises(ValueError, match='no trainable'):
        param_groups(m.requires_grad_(False))


def test_gates_not_decayed_by_optimizer():
    m = ToyVQA(); g0 = m.gate_logit.detach().clone(); w0 = m.head.weight.detach().clone()
    opt = torch.optim.AdamW(param_groups(m, 0.5), lr=0.1)
    for p in m.parameters(): p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(m.gate_logit.detach(), g0)
    torch.testing.assert_close(m.head.weight.detach(), w0 * 0.95)


def test_precision_falls_back_on_cpu():
    with pytest.warns(UserWarning, match='CPU'):
        assert resolve_precision('fp16', torch.device('cpu')) == 'no'
    with pytest.raises(ValueError, match='mixed_precision'):
        resolve_precision('int8', torch.device('cpu'))
    tr, _ = loaders(32)
    with pytest.warns(UserWarning, match='CPU'):
        assert fit(ToyVQA(), tr, epochs=1, mixed_precision='bf16').mixed_precision == 'no'


def test_fit_learns_and_restores_best():
    torch.manual_seed(0); m = ToyVQA()
    tr, va = loaders(256, bs=32)
    r = fit(m, tr, va, epochs=6, lr=1e-2)
    h = r.history
    assert len(h) == 6 and len(r.steps) == 6 * 8
    assert {'train_loss', 'val_loss', 'val_accuracy', 'grad_norm', 'lr', 'epoch_time_s', 'samples_per_s'} <= set(h.columns)
    assert h.train_loss.iloc[-1] < h.train_loss.iloc[0] and h.val_accuracy.max() > 0.4
    assert r.best_epoch == int(h.val_accuracy.idxmax())
    assert evaluate(m, va)['accuracy'] == pytest.approx(h.val_accuracy.max())


def test_cosine_warmup_schedule():
    tr, _ = loaders(64, bs=16)                      # 4 steps per epoch, 5 epochs -> 20 steps, warm-up 4
    r = fit(ToyVQA(), tr, epochs=5, lr=1.0, warmup=4)
    w, T = 4, 20
    exp = [s / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (T - w))) for s in range(T)]
    np.testing.assert_allclose(r.steps.lr.to_numpy(), exp, atol=1e-12)
    r = fit(ToyVQA(), tr, epochs=5, lr=1.0, warmup=0.25)   # fraction: the same 5 warm-up steps of 20
    assert r.steps.lr.iloc[5] == pytest.approx(1.0) and r.steps.lr.iloc[2] == pytest.approx(0.4)


def test_same_seed_same_history():
    def run(seed):
        torch.manual_seed(0); m = ToyVQA(dropout=0.2)
        tr, va = loaders()
        return m, fit(m, tr, va, epochs=2, lr=5e-3, seed=seed)
    (m1, r1), (m2, r2), (_, r3) = run(0), run(0), run(1)
    pd.testing.assert_frame_equal(no_timing(r1.history), no_timing(r2.history))
    pd.testing.assert_frame_equal(r1.steps, r2.steps)
    assert same_weights(m1, m2)
    assert not r1.steps.loss.equals(r3.steps.loss)


def test_grad_accum_matches_large_batch():
    def run(bs, accum):
        torch.manual_seed(0); m = ToyVQA()
        fit(m, torch.utils.data.DataLoader(toy_data(64), batch_size=bs), epochs=2, lr=1e-2, grad_accum=accum,
            warmup=0, grad_clip=None)
        return m
    a, b = run(16, 1), run(8, 2)
    for x, y in zip(a.parameters(), b.parameters()): torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_grad_clip_records_norm_before_clipping():
    tr, _ = loaders(32)
    r = fit(ToyVQA(), tr, epochs=1, lr=1e-3, grad_clip=1e-6)
    assert (r.steps.grad_norm > 1e-6).all()


class Stop(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    def run(d, interrupt):
        torch.manual_seed(0); m = ToyVQA(dropout=0.1)
        tr, va = loaders()
        kw = dict(epochs=4, lr=5e-3, seed=7, checkpoint_dir=d)
        if not interrupt: return m, fit(m, tr, va, **kw)
        def cb(row):
            if row['epoch'] == 1: raise Stop()
        with pytest.raises(Stop): fit(m, tr, va, on_epoch_end=cb, **kw)
        assert (d / CHECKPOINT_NAME).is_file()
        torch.manual_seed(99); m = ToyVQA(dropout=0.1)
        return m, fit(m, tr, va, resume=True, **kw)
    mu, ru = run(tmp_path / 'a', False)
    mr, rr = run(tmp_path / 'b', True)
    assert same_weights(mu, mr)
    pd.testing.assert_frame_equal(no_timing(ru.history), no_timing(rr.history))
    pd.testing.assert_frame_equal(ru.steps, rr.steps)
    # a resume with other settings is refused, naming them
    with pytest.raises(ValueError, match='lr'):
        fit(ToyVQA(), *loaders(), epochs=4, lr=1e-3, seed=7, checkpoint_dir=tmp_path / 'b', resume=True)
    with pytest.raises(FileNotFoundError):
        fit(ToyVQA(), *loaders(), epochs=1, resume=tmp_path / 'nothing')


def test_checkpoint_roundtrip(tmp_path):
    m = ToyVQA(); opt = torch.optim.AdamW(param_groups(m), lr=1e-2)
    for b in loaders(32)[0]:
        m(b)['loss'].backward(); opt.step(); opt.zero_grad()
    p = save_checkpoint(tmp_path / 'c.safetensors', m, opt, meta=dict(step=2, note='x'))
    m2 = ToyVQA(); opt2 = torch.optim.AdamW(param_groups(m2), lr=1e-2)
    info = load_checkpoint(p, m2, opt2)
    assert info['step'] == 2 and info['note'] == 'x' and same_weights(m, m2)
    s1, s2 = opt.state_dict()['state'], opt2.state_dict()['state']
    assert all(torch.equal(s1[i]['exp_avg_sq'], s2[i]['exp_avg_sq']) for i in s1)


class Diverge(ToyVQA):
    def __init__(self, at): super().__init__(); self.at, self.calls = at, 0
    def forward(self, batch):
        out = super().forward(batch); self.calls += 1
        if self.calls >= self.at: out['loss'] = out['loss'] * float('inf')
        return out


def test_nonfinite_loss_names_step():
    tr, _ = loaders(128, bs=16)
    with pytest.raises(FloatingPointError, match='at step 4'):
        fit(Diverge(4), tr, epochs=2)
    with pytest.raises(FloatingPointError, match='at step 2'):
        fit(Diverge(4), tr, epochs=2, grad_accum=3)


def test_early_stopping_and_metric_modes():
    tr, va = loaders()
    r = fit(ToyVQA(), tr, va, epochs=10, metric=lambda logits, y: 1.0, patience=3)
    assert r.stopped_early and len(r.history) == 4 and r.best_epoch == 0
    r = fit(ToyVQA(), tr, va, epochs=3, metric='loss', lr=1e-2)
    assert r.best_metric == pytest.approx(r.history.val_loss.min())


def test_model_returning_only_logits_and_loss_fn():
    class LogitsOnly(ToyVQA):
        def forward(self, batch): return super().forward({k: v for k, v in batch.items() if k != 'answer'})['logits']
    tr, va = loaders()
    r = fit(LogitsOnly(), tr, va, epochs=1)
    assert np.isfinite(r.history.train_loss.iloc[0])
    calls = []
    def loss_fn(out, batch):
        calls.append(1); return F.cross_entropy(out['logits'], batch['answer'])
    fit(ToyVQA(), tr, epochs=1, loss_fn=loss_fn)
    assert len(calls) == len(tr)


def test_predict_and_evaluate_per_qtype():
    _, va = loaders()
    class Oracle(nn.Module):
        def forward(self, b): return {'logits': F.one_hot(b['answer'], 5).float()}
    e = evaluate(Oracle(), va)
    assert e['accuracy'] == 1.0 and e['n'] == 64 and len(e['per_qtype']) == 4
    p = predict(ToyVQA(), va)
    assert p['logits'].shape == (64, 5) and p['preds'].shape == (64,) and torch.equal(p['answer'], va.dataset.t['answer'])


@pytest.mark.parametrize('kw,msg', [(dict(epochs=0), 'epochs'), (dict(lr=float('nan')), 'lr'), (dict(grad_accum=0), 'grad_accum'),
                                    (dict(warmup=-1), 'warmup'), (dict(mixed_precision='fp32'), 'mixed_precision'),
                                    (dict(metric='f1'), 'metric'), (dict(patience=2), 'val_loader'), (dict(seed=-1), 'seed')])
def test_bad_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fit(ToyVQA(), loaders(32)[0], **kw)
