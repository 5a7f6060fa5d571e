"vlm_lab.backbones beyond 02_backbones: the committed asset's format and a deterministic pretraining through fit."
import pytest
import torch

from vlm_lab.backbones import (evaluate_shapes_vit, load_shapes_vit_head, load_text, load_vision, pretrain_shapes_vit,
                               scene_targets)


def test_shapes_vit_asset_loads_in_fp32():
    vit = load_vision('shapes-vit')
    assert vit.hidden_size == 128 and vit.image_size == 64 and vit.config.patch_size == 8
    assert next(vit.parameters()).dtype == torch.float32               # stored fp16, loaded fp32
    with torch.no_grad(): out = vit(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 65, 128) and torch.isfinite(out).all()
    m = evaluate_shapes_vit(vit, load_shapes_vit_head(), n_scenes=16)
    assert set(m) >= {'cell_acc', 'shape_acc', 'color_acc', 'count_acc'}


def test_pretraining_through_fit_is_deterministic():
    kw = dict(n_scenes=32, epochs=1, batch_size=16, width=32, layers=1, heads=2, seed=5)
    e1, h1, log = pretrain_shapes_vit(**kw)
    e2, h2, _ = pretrain_shapes_vit(**kw)
    assert len(log['epoch_loss']) == 1 and log['params']['loop'] == 'vlm_lab.train.fit'
    assert all(torch.equal(a, b) for a, b in zip(e1.state_dict().values(), e2.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(h1.state_dict().values(), h2.state_dict().values()))
    t = scene_targets([dict(objects=[dict(shape='circle', color='red', row=0, col=0)])])
    assert t['color'][0, 0] == 1 and t['shape'][0, 0] == 0 and t['shape'][0, 1] == -100 and t['count'][0] == 0
    with pytest.raises(ValueError, match='n_scenes'): pretrain_shapes_vit(n_scenes=8, batch_size=16)


def test_missing_folders_are_named():
    with pytest.raises(FileNotFoundError, match='/no/such'): load_vision('/no/such')
    with pytest.raises(FileNotFoundError, match='/no/such'): load_text('/no/such')
