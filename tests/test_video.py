"vlm_lab.video beyond 01a_video: ShapesVideo items, seeding and parameter errors."
import pytest
import torch

from vlm_lab.video import ShapesVideo


def test_video():
    v = ShapesVideo(n=3, frames=5, seed=1)
    it = v[0]
    assert it['frames'].shape == (5, 3, 64, 64) and it['positions'].shape[0] == 5
    assert torch.equal(ShapesVideo(n=3, frames=5, seed=1)[2]['frames'], v[2]['frames'])
    assert 'moves' in it['caption']
    with pytest.raises(ValueError, match='frames=1'): ShapesVideo(frames=1)

