"vlm_lab.train beyond 03_train: precision fallback in fit, integer warm-up, clip log, resume errors, inf loss, logits only."
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlm_lab.train import CHECKPOINT_NAME, fit, resolve_precision


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


def DictDataset(**tensors): return torch.utils.data.StackDataset(**tensors)


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


def test_precision_falls_back_on_cpu():
    with pytest.warns(UserWarning, match='CPU'):
        assert resolve_precision('fp16', torch.device('cpu')) == 'no'
    with pytest.raises(ValueError, match='mixed_precision'):
        resolve_precision('int8', torch.device('cpu'))
    tr, _ = loaders(32)
    with pytest.warns(UserWarning, match='CPU'):
        assert fit(ToyVQA(), tr, epochs=1, mixed_precision='bf16').mixed_precision == 'no'


def test_cosine_warmup_schedule():
    tr, _ = loaders(64, bs=16)                      # 4 steps per epoch, 5 epochs -> 20 steps, warm-up 4
    r = fit(ToyVQA(), tr, epochs=5, lr=1.0, warmup=4)
    w, T = 4, 20
    exp = [s / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (T - w))) for s in range(T)]
    np.testing.assert_allclose(r.steps.lr.to_numpy(), exp, atol=1e-12)
    r = fit(ToyVQA(), tr, epochs=5, lr=1.0, warmup=0.25)   # fraction: the same 5 warm-up steps of 20
    assert r.steps.lr.iloc[5] == pytest.approx(1.0) and r.steps.lr.iloc[2] == pytest.approx(0.4)


def test_grad_clip_records_norm_before_clipping():
    tr, _ = loaders(32)
    r = fit(ToyVQA(), tr, epochs=1, lr=1e-3, grad_clip=1e-6)
    assert (r.steps.grad_norm > 1e-6).all()


class Stop(Exception):
    pass


def test_resume_refuses_other_settings_and_missing_files(tmp_path):
    "The notebook shows resume == uninterrupted; here: a changed lr is named, a missing checkpoint path is an error."
    def stop(row): raise Stop()
    kw = dict(epochs=4, lr=5e-3, seed=7, checkpoint_dir=tmp_path)
    with pytest.raises(Stop): fit(ToyVQA(), *loaders(), on_epoch_end=stop, **kw)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    with pytest.raises(ValueError, match="'lr'"):
        fit(ToyVQA(), *loaders(), **{**kw, 'lr': 1e-3}, resume=True)
    with pytest.raises(FileNotFoundError, match='nothing'):
        fit(ToyVQA(), *loaders(), epochs=1, resume=tmp_path / 'nothing')
    r = fit(ToyVQA(), *loaders(), resume=True, **kw)                  # the same settings continue from epoch 1
    assert r.history.epoch.tolist() == [0, 1, 2, 3]


class Diverge(ToyVQA):
    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0
    def forward(self, batch):
        out = super().forward(batch)
        self.calls += 1
        if self.calls >= self.at: out['loss'] = out['loss'] * float('inf')
        return out


def test_nonfinite_loss_names_step():
    tr, _ = loaders(128, bs=16)
    with pytest.raises(FloatingPointError, match='at step 4'):
        fit(Diverge(4), tr, epochs=2)
    with pytest.raises(FloatingPointError, match='at step 2'):
        fit(Diverge(4), tr, epochs=2, grad_accum=3)


def test_model_returning_only_logits_and_loss_fn():
    class LogitsOnly(ToyVQA):
        def forward(self, batch): return super().forward({k: v for k, v in batch.items() if k != 'answer'})['logits']
    tr, va = loaders()
    r = fit(LogitsOnly(), tr, va, epochs=1)
    assert np.isfinite(r.history.train_loss.iloc[0])
    calls = []
    def loss_fn(out, batch):
        calls.append(1)
        return F.cross_entropy(out['logits'], batch['answer'])
    fit(ToyVQA(), tr, epochs=1, loss_fn=loss_fn)
    assert len(calls) == len(tr)