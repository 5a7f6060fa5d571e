import json, math

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from vlm_lab.core import (check_bool, check_choice, check_float, check_int, check_seeds, figure_name, load_results,
                          mean_ci, params_hash, save_result, savefig, seed_everything, get_device, project_root,
                          atomic_write, current_umask)


@pytest.mark.parametrize('value', [0, -3, 'four', '4', 2.5, True, None, [4]])
def test_check_int_rejects(value):
    with pytest.raises(ValueError, match=r"layers=.*expected an integer >= 1"):
        check_int('layers', value, min=1)


def test_check_int_accepts_integral():
    assert check_int('layers', 4, min=1) == 4 and check_int('layers', np.int64(6), min=1) == 6
    assert check_int('layers', 4.0, min=1) == 4


def test_check_float_choice_bool():
    assert check_float('bias', 1, min=0, max=1) == 1.0
    for bad in (-0.1, 1.1, 'x', float('inf'), False):
        with pytest.raises(ValueError, match='bias'): check_float('bias', bad, min=0, max=1)
    with pytest.raises(ValueError, match=r"mode='dep'.*one of \['shallow', 'deep'\]"):
        check_choice('mode', 'dep', ['shallow', 'deep'])
    with pytest.raises(ValueError, match='r=-4'): check_int('r', -4, min=1)
    assert check_bool('flag', True) is True
    with pytest.raises(ValueError, match='flag'): check_bool('flag', 1)


def test_check_seeds():
    assert check_seeds('seeds', 3) == [0, 1, 2]
    assert check_seeds('seeds', '3,5') == [3, 5]
    assert check_seeds('seeds', (1, 2)) == [1, 2]
    for bad in (0, -1, [], [0, 0], 'x', [1.5], True):
        with pytest.raises(ValueError, match='seeds'): check_seeds('seeds', bad)


def test_seed_everything_reproducible():
    seed_everything(123); a = (torch.randn(5), np.random.rand(3))
    seed_everything(123); b = (torch.randn(5), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    seed_everything(124); c = torch.randn(5)
    assert not torch.equal(a[0], c)
    with pytest.raises(ValueError, match='seed'): seed_everything(-1)


def test_device(monkeypatch):
    assert get_device('cpu').type == 'cpu'
    monkeypatch.setenv('VLM_LAB_DEVICE', 'cpu')
    assert get_device().type == 'cpu'
    with pytest.raises(ValueError, match='device'): get_device('tpu')


def test_project_root(tmp_path, monkeypatch):
    monkeypatch.delenv('VLM_LAB_ROOT', raising=False)
    (tmp_path / 'settings.ini').write_text('[DEFAULT]\nlib_name = vlm_lab\n')
    (tmp_path / 'nbs').mkdir()
    assert project_root(tmp_path / 'nbs') == tmp_path
    other = tmp_path / 'elsewhere'; other.mkdir()
    (other / 'settings.ini').write_text('[DEFAULT]\nlib_name = other\n')
    assert project_root(other) == tmp_path   # a foreign settings.ini is not ours


def test_save_and_load_results(lab_root):
    p = save_result('05_fd', dict(layers=4, seeds=[0, 1]), dict(acc=[0.6, np.float32(0.7)], gate=torch.tensor(0.9)),
                    claims=['FD-3'], wall_time=1.5)
    assert p == lab_root / 'results' / '05_fd' / f"{params_hash(dict(seeds=[0, 1], layers=4))}.json"
    rec = json.loads(p.read_text())
    assert rec['params'] == {'layers': 4, 'seeds': [0, 1]} and rec['claims'] == ['FD-3']
    assert rec['seed'] == [0, 1] and rec['wall_time_s'] == 1.5 and rec['versions']['torch']
    assert rec['metrics']['acc'][1] == pytest.approx(0.7) and rec['metrics']['gate'] == pytest.approx(0.9)
    save_result('05_fd', dict(layers=2, seeds=[0, 1]), dict(acc=[0.5, 0.6]))
    save_result('06_gd', dict(w=0.1), dict(ratio=0.37))
    assert len(load_results('05_fd')) == 2 and len(load_results()) == 3
    assert set(load_results('05_fd')['params.layers']) == {2, 4}
    assert len(load_results('nothing')) == 0
    assert not list((lab_root / 'results').rglob('*.tmp'))


def test_save_result_refuses_bad_input_and_writes_nothing(lab_root):
    with pytest.raises(ValueError, match='metrics'): save_result('x', {}, {})
    with pytest.raises(TypeError, match='cannot store'): save_result('x', {}, {'m': object()})
    with pytest.raises(ValueError, match='notebook'): save_result('../evil', {}, {'m': 1})
    assert not (lab_root / 'results').exists() or not list((lab_root / 'results').rglob('*'))


def test_nan_metrics_become_null(lab_root):
    p = save_result('x', {}, {'m': float('nan'), 'v': [1.0, float('inf')]})
    assert json.loads(p.read_text())['metrics'] == {'m': None, 'v': [1.0, None]}


def test_corrupt_result_is_named(lab_root):
    d = lab_root / 'results' / 'nb'; d.mkdir(parents=True); (d / 'bad.json').write_text('{')
    with pytest.raises(ValueError, match='bad.json'): load_results('nb')


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = atomic_write(tmp_path / 'f.txt', 'old')
    class Boom(str):
        def encode(self): raise RuntimeError('boom')
    with pytest.raises(RuntimeError): atomic_write(p, Boom('new'))
    assert p.read_text() == 'old' and [f.name for f in tmp_path.iterdir()] == ['f.txt']


def test_written_files_get_the_umask_mode(tmp_path, lab_root):
    "mkstemp's 0600 must not leak into results: a written file gets the mode any new file gets."
    assert (atomic_write(tmp_path / 'g.txt', 'x').stat().st_mode & 0o777) == 0o666 & ~current_umask()
    path = save_result('nb', {'a': 1}, {'m': 1.0})
    assert (path.stat().st_mode & 0o777) == 0o666 & ~current_umask()


def test_savefig(lab_root):
    fig, ax = plt.subplots(); ax.plot([0, 1])
    p = savefig(fig, 'acc vs depth', dict(layers=4, seeds=[0, 1, 2]))
    assert p == lab_root / 'results' / 'figures' / 'acc_vs_depth__layers=4_seeds=0-1-2.png'   # never tracked figures/
    assert p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    plt.close(fig)


def test_mean_ci():
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3 and ci.half == pytest.approx(4.302653 / math.sqrt(3))
    one = mean_ci([5.0])
    assert one.n == 1 and math.isinf(one.half)


def test_figure_name_is_filesystem_safe():
    assert figure_name('a/b c', {'mode': "dee p/x"}) == 'a_b_c__mode=deepx.png'
