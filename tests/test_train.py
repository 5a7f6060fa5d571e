"""vlm_lab.train beyond 03_train: precision fallback in fit, integer warm-up, clip log, resume errors, inf loss, logits
only, gathered evaluation, metric objects in the config, and that train knows nothing of the lab's data."""
import ast, dataclasses, math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlm_lab.metrics as metrics
import vlm_lab.train as train
import vlm_lab.trainable as trainable
from vlm_lab.metrics import GroupAccuracy, Loss, batch_size_of, evaluate
from vlm_lab.toys import ToyVQA, toy_loaders
from vlm_lab.train import CHECKPOINT_NAME, TrainConfig, fit, resolve_precision


def loaders(n=128, bs=16, seed=0): return toy_loaders(n, bs=bs, seed=seed)


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
    with pytest.raises(ValueError, match="'lr_groups'"):                # another trainable set / rate is another run
        fit(ToyVQA(), *loaders(), **kw, lr_groups={'head.*': 1e-2}, resume=True)
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

def test_evaluate_gathers_every_batch_and_never_predicts(monkeypatch):
    "`gather` (accelerate's gather_for_metrics under several processes) sees every tensor; evaluate never concatenates."
    monkeypatch.setattr(metrics, 'predict', lambda *a, **k: pytest.fail('evaluate called predict'))
    torch.manual_seed(0)
    m, (_, va) = ToyVQA(), loaders()
    one = evaluate(m, va)
    two = evaluate(m, va, gather=lambda t: torch.cat([t, t]))     # as if a second process held the same samples
    assert two['n'] == 2 * one['n'] == 128
    assert two['accuracy'] == one['accuracy'] and two['per_qtype'] == one['per_qtype']
    assert two['loss'] == pytest.approx(one['loss'], rel=1e-6)


def test_metric_object_in_config_and_group_names_in_history():
    class Margin:
        "Mean top-1 minus top-2 logit, per sample."
        def __init__(self): self.s, self.n = 0.0, 0
        def update(self, out, batch):
            top = out['logits'].topk(2, dim=-1).values
            self.s += float((top[:, 0] - top[:, 1]).sum()); self.n += len(top)
        def compute(self): return dict(margin=self.s / self.n)
    tr, va = loaders()
    cfg = TrainConfig(epochs=2, metric=Margin(), mode='max')
    assert cfg.metric_name == 'Margin' and cfg.goal == 'max'
    r = fit(ToyVQA(), tr, va, cfg, metrics=[Loss(), GroupAccuracy(names=['w', 'x', 'y', 'z'])])
    assert r.best_metric == r.history.val_margin.max()
    assert [c for c in r.history.columns if c.startswith('val_')] == \
        ['val_loss', 'val_acc_w', 'val_acc_x', 'val_acc_y', 'val_acc_z', 'val_margin']
    with pytest.raises(ValueError, match='dataclasses.replace'):
        fit(ToyVQA(), tr, va, cfg, epochs=3)
    r = fit(ToyVQA(), tr, va, dataclasses.replace(cfg, epochs=1))
    assert len(r.history) == 1
    with pytest.raises(ValueError, match="metric='accuracy'"):         # the metrics given do not return it
        fit(ToyVQA(), tr, va, epochs=1, metrics=[Loss()])


def test_batch_size_without_answers():
    assert batch_size_of({'tokens': torch.zeros(3, 7), 'answer': torch.zeros(3)}) == 3
    assert batch_size_of({'scale': torch.tensor(2.0), 'x': torch.zeros(5, 2)}) == 5
    with pytest.raises(ValueError, match='no tensors'):
        batch_size_of({'names': ['a', 'b']})


def test_training_modules_do_not_import_the_data_module():
    "Group names come from the caller: the training modules know no dataset and no diagnostics."
    for mod in (train, trainable, metrics):
        tree = ast.parse(Path(mod.__file__).read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.endswith('data') for m in mods) and not any('diagnostics' in m for m in mods), mod
