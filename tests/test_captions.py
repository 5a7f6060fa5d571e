"vlm_lab.captions beyond 01b_captions: every ground-truth caption scores perfectly."
from vlm_lab.captions import ShapesCaptions, caption_score


def test_captions():
    c = ShapesCaptions(n=10, seed=0)
    for r in c.records:
        assert all(caption_score(cap, r['objects'])['f1'] == 1.0 for cap in r['captions'])
    objs = c.records[0]['objects']
    assert caption_score('', objs)['f1'] == 0.0
