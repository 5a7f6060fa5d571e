"vlm_lab.features beyond 02a_features: text dedup, cache keys per backbone and dataset, FeatureDataset batching."
import pytest
import torch

from vlm_lab.backbones import tiny_text, tiny_vision
from vlm_lab.data import ShapesVQA
from vlm_lab.features import FEATURE_CACHE_LOG, FeatureDataset, feature_dataset, text_features, vision_features


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('VLM_LAB_CACHE', str(tmp_path / 'cache'))
    FEATURE_CACHE_LOG.clear()
    return tmp_path / 'cache'


def test_text_features_unique_and_index(tmp_cache):
    tm, tok = tiny_text()
    qs = ['a red circle?', 'a blue square?', 'a red circle?', 'a red circle?', 'what?']
    f, m, idx = text_features(tm, tok, qs)
    assert f.shape[0] == 3 and m.shape == f.shape[:2] and m.dtype == torch.bool
    assert idx.tolist() == [0, 1, 0, 0, 2]
    f2, _, _ = text_features(tm, tok, qs)
    assert torch.equal(f, f2) and [e['status'] for e in FEATURE_CACHE_LOG] == ['built', 'hit']


def test_another_backbone_or_dataset_gets_its_own_entry(tmp_cache):
    ds, vis = ShapesVQA(n=24, seed=4), tiny_vision()
    vision_features(vis, ds)
    vision_features(tiny_vision(seed=1), ds)
    vision_features(vis, ShapesVQA(n=24, seed=5))
    vision_features(vis, ds)
    assert [e['status'] for e in FEATURE_CACHE_LOG] == ['built', 'built', 'built', 'hit']
    assert all(e['path'].startswith(str(tmp_cache / 'features')) for e in FEATURE_CACHE_LOG)


def test_feature_dataset_batches_shuffle_and_subset(tmp_cache):
    ds = ShapesVQA(n=20, seed=1)
    tm, tok = tiny_text()
    fd = feature_dataset(ds, tiny_vision(), tm, tok)
    b = next(fd.batches(8))
    assert b['vision'].shape == (8, 17, 32) and b['text_mask'].dtype == torch.bool and b['answer'].dtype == torch.long
    assert [int(x) for x in b['answer']] == [ds.answer_ids[ds.records[i]['answer']] for i in range(8)]
    s1 = [x['index'].tolist() for x in fd.batches(8, shuffle=True, seed=3)]
    s2 = [x['index'].tolist() for x in fd.batches(8, shuffle=True, seed=3)]
    assert s1 == s2 and sorted(sum(s1, [])) == list(range(20))
    assert len(fd.subset([0, 2, 4])) == 3
    with pytest.raises(ValueError, match='text_index'):
        FeatureDataset(fd.vision, fd.text, fd.text_mask, fd.text_index[:3], fd.answer, fd.qtype)
