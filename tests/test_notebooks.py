"""Finding notebooks run end to end under papermill, refuse bad parameters before writing anything, and end in a
verdict table whose every verdict follows from its own numbers."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

from vlm_lab.claims import CLAIMS, get_claim
from vlm_lab.findings import MIN_SAMPLES, VERDICTS

ROOT = Path(__file__).resolve().parents[1]
PAPERMILL = [sys.executable, '-m', 'papermill']


def run_nb(nb, out, root, *params, timeout=900):
    "Run nbs/<nb> with papermill into `out`, results/figures/cache under `root`; return the CompletedProcess."
    args = [*PAPERMILL, str(ROOT / 'nbs' / nb), str(out), '--cwd', str(ROOT / 'nbs'), '--no-progress-bar']
    for k, v in params: args += ['-p', k, str(v)]
    env = {**os.environ, 'VLM_LAB_ROOT': str(root), 'VLM_LAB_CACHE': str(ROOT / '.cache'), 'VLM_LAB_DEVICE': 'cpu'}
    env.pop('VLM_LAB_FIGURES', None)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def written(root):
    return sorted(str(p.relative_to(root)) for d in ('results', 'figures') for p in (root / d).rglob('*') if p.is_file())


NOISY = ('direction', 'range', 'equivalence')


def assert_refused(nb, root, params, message):
    "A bad parameter: the run fails with a message naming it, and nothing is written."
    r = run_nb(nb, root / 'out.ipynb', root, *params)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout
    assert written(root) == []


def check_table(rows, finding):
    "Every claim of the finding has a row; no noisy row decides from fewer than 5 samples or from zero spread."
    assert {c.id for c in CLAIMS if c.finding == finding} == {r['id'] for r in rows}
    for r in rows:
        assert r['kind'] == get_claim(r['claim'].split(' [')[0]).kind and r['verdict'] in VERDICTS, r
        if r['kind'] in NOISY and r['verdict'] not in ('inconclusive', 'not tested', 'measured'):
            assert r['n'] >= MIN_SAMPLES and r['hi'] > r['lo'] and r['noise'], r
        if r['verdict'] == 'not tested': assert r['why'].startswith('needs '), r


@pytest.mark.parametrize('params,message', [
    ((('layers', 0),), 'parameter layers=0 is invalid'),
    ((('layers', 'four'),), "parameter layers='four' is invalid"),
    ((('layers', 2),), 'expected more than baseline_layers=2'),
    ((('profile', 'fast'),), "parameter profile='fast' is invalid"),
    ((('bias', 1.5),), 'parameter bias=1.5 is invalid'),
    ((('seeds', 0),), 'parameter seeds=0 is invalid'),
    ((('seeds', 2), ('side_seeds', '5')), 'expected a subset of seeds'),
    ((('low_gate_init', 3.0),), 'expected below gate_init'),
    ((('test_size', 50),), 'parameter test_size=50 is invalid'),
    ((('gate_at', 'input'),), "parameter gate_at='input' is invalid"),
])
def test_fusion_depth_bad_parameters_write_nothing(tmp_path, params, message):
    assert_refused('05_fusion_depth.ipynb', tmp_path, params, message)


SMALL = (('seeds', 2), ('side_seeds', 2), ('epochs', 2), ('n_samples', 400), ('timing_repeats', 2), ('test_size', 300))


@pytest.mark.parametrize('layers', [3, 6])
def test_fusion_depth_small_run(tmp_path, layers):
    r = run_nb('05_fusion_depth.ipynb', tmp_path / 'out.ipynb', tmp_path, ('layers', layers), *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    files = written(tmp_path)
    results = [f for f in files if f.startswith('results/05_fusion_depth/')]
    assert len(results) == 1
    rec = json.loads((tmp_path / results[0]).read_text())
    assert rec['params']['layers'] == layers and rec['params']['seeds'] == [0, 1]
    runs = rec['metrics']['runs']
    assert sorted(set(zip(runs['condition'], runs['depth'], runs['gate_at']))) == sorted(
        [('base', 2, 'output'), ('deep', layers, 'output'), ('low gate', 2, 'output'), ('scratch half', layers, 'output'),
         ('warm', layers, 'output'), ('base @tokens', 2, 'tokens'), ('low gate @tokens', 2, 'tokens')])
    rows = {r['claim']: r for r in rec['verdicts']}
    check_table(rec['verdicts'], 'FD')
    assert all(r['verdict'] in ('inconclusive', 'not tested') for r in rec['verdicts'] if r['kind'] in NOISY)
    assert 'max |logit change| 0.0e+00' in rows['FD-9 loading']['measured']    # the mechanism: a grown model is exact
    assert rows['FD-6']['verdict'] == 'inconclusive'                   # the plausible shapes give 8.4M to 25.2M
    assert rows['FD-8']['verdict'] == 'not tested'                                 # no grid in this run
    flops = rec['metrics']['flops']                                    # exact: more layers, more FLOPs, same batches
    assert all(f[str(layers)] > f['2'] > 0 for f in flops.values()) and set(flops) == {
        'cached features', 'backbones every step'}
    assert rows['FD-7 FLOPs, cached features']['kind'] == 'mechanism' and 'FD-10 direction [gate at tokens]' in rows
    assert any(f'layers={layers}' in f and f.startswith('results/figures/fd_accuracy_drop_gate_vs_depth') for f in files)
    assert not any(f.startswith('figures/') for f in files)               # runs never write the tracked figures/


def test_fusion_depth_grid(tmp_path):
    "The FD-8 depth x data-size grid (full profile) runs at toy scale and yields a heatmap and a computed verdict."
    r = run_nb('05_fusion_depth.ipynb', tmp_path / 'out.ipynb', tmp_path, ('grid', True), ('grid_sizes', '300,500'),
               ('grid_depths', '1,2'), *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(next((tmp_path / 'results' / '05_fusion_depth').glob('*.json')).read_text())
    grid = rec['metrics']['grid']
    assert {(g['n'], g['depth']) for g in grid} == {(n, d) for n in (300, 500) for d in (1, 2)} and len(grid) == 8
    fd8 = next(r for r in rec['verdicts'] if r['claim'] == 'FD-8')
    assert fd8['verdict'] == 'inconclusive' and fd8['n'] == 2 and 'at least 5' in fd8['why']
    check_table(rec['verdicts'], 'FD')
    assert any(f.startswith('results/figures/fd_depth_by_data_grid') for f in written(tmp_path))


@pytest.mark.parametrize('params,message', [
    ((('mode', 'half'),), "parameter mode='half' is invalid"),
    ((('modes', 'none,triple'),), "parameter modes='triple' is invalid"),
    ((('loops', 0),), 'parameter loops=0 is invalid'),
    ((('adapter_weight', 1.5),), 'parameter adapter_weight=1.5 is invalid'),
    ((('epochs', 1),), 'parameter epochs=1 is invalid'),
    ((('steps', 0),), 'parameter steps=0 is invalid'),
    ((('steps', 100), ('epochs', 4)), 'parameters steps=100 and epochs=4 are both given'),
])
def test_gradient_dilution_bad_parameters_write_nothing(tmp_path, params, message):
    assert_refused('06_gradient_dilution.ipynb', tmp_path, params, message)


@pytest.mark.parametrize('mode', ['full', 'gated'])
def test_gradient_dilution_small_run(tmp_path, mode):
    budget = ('epochs', 2) if mode == 'full' else ('steps', 7)         # 240 training scenes: 8 steps of 32 an epoch
    r = run_nb('06_gradient_dilution.ipynb', tmp_path / 'out.ipynb', tmp_path, ('mode', mode), ('modes', 'fixed'),
               ('seeds', 2), ('grad_seeds', 3), budget, ('n_samples', 300), ('test_size', 40))
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(next((tmp_path / 'results' / '06_gradient_dilution').glob('*.json')).read_text())
    assert rec['params']['modes'] == ['none', 'fixed', mode]
    assert rec['params']['epochs'] == 2 and rec['params']['steps'] == (None if mode == 'full' else 7)
    rows = {r['claim']: r for r in rec['verdicts']}
    check_table(rec['verdicts'], 'GD')
    assert rows['GD-4']['verdict'] == 'not tested' and 'learnable' in rows['GD-4']['why']   # not trained
    assert [c for c in rows if c.startswith('GD-9')] == [f'GD-9 [scale {s}]' for s in ('0.3', '1', '3', '10', '30')]
    assert 'GD-1 direction [24-block ViT, raw context]' in rows and 'GD-5 [LayerNorm on the context]' in rows
    assert 'fixed x3 loops' in rec['metrics']['runs']['condition']          # the feedback model beside the 1-loop runs
    assert all(rows[c]['verdict'] != 'not tested' for c in ('GD-3 feedback beats base', 'GD-7'))
    ratios = rec['metrics']['ratios']
    assert {'ratio', 'branch_stream', 'predicted'} <= set(ratios)       # every ratio beside its operating point
    if mode == 'gated':                                                # a zero gate adds nothing: ratio exactly 1
        assert all(abs(x - 1) < 1e-9 for m, x in zip(ratios['mode'], ratios['ratio']) if m == 'gated')
    assert any(f.startswith('results/figures/gd_gradient_ratio') for f in written(tmp_path))


@pytest.mark.parametrize('params,message', [
    ((('mode', 'half'),), "parameter mode='half' is invalid"),
    ((('q_std', -1.0),), 'parameter q_std=-1.0 is invalid'),
    ((('region_fixes', 'temperature,magic'),), "parameter region_fixes='magic' is invalid"),
    ((('seeds', 2), ('side_seeds', '3')), 'expected a subset of seeds'),
])
def test_query_init_bad_parameters_write_nothing(tmp_path, params, message):
    assert_refused('07_query_init.ipynb', tmp_path, params, message)


def test_query_init_small_run(tmp_path):
    "The smallest run: every QI claim gets a row, the exact checks hold at any scale, nothing noisy is decided."
    r = run_nb('07_query_init.ipynb', tmp_path / 'out.ipynb', tmp_path, ('q_std', 0.02), ('mode', 'shallow'),
               ('seeds', 2), ('side_seeds', 1), ('init_seeds', 2), ('steps', 2), ('n_clips', 8), ('test_clips', 4),
               ('frames', 3), ('timing_repeats', 2), ('fix', 'temperature'), ('region_fixes', 'frozen'))
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(next((tmp_path / 'results' / '07_query_init').glob('*.json')).read_text())
    assert rec['params']['mode'] == 'shallow' and rec['params']['seeds'] == [0, 1]
    check_table(rec['verdicts'], 'QI')
    rows = {r['claim']: r for r in rec['verdicts']}
    assert all(r['verdict'] in ('inconclusive', 'not tested') for r in rec['verdicts'] if r['kind'] in NOISY)
    assert rows['QI-12']['verdict'] == 'mechanism'                    # LayerNorm: scale invariant at any scale
    assert rows['QI-5']['verdict'] == 'refuted' and '|loss change|' in rows['QI-5']['measured']   # no batch norm
    assert rows['QI-8 [16 frames]']['verdict'] == 'not tested'                  # long clips: full profile only
    assert rows['QI-11 [note: contrastive]']['verdict'] == 'not tested'         # fix='temperature' ran only that one
    assert sorted(set(rec['metrics']['runs']['condition'])) == [
        'note/base', 'note/passes 3', 'note/temperature', 'small-region/base']
    files = written(tmp_path)
    for fig in ('qi_init_grid', 'qi_attention_maps', 'qi_fine_coarse_ratio', 'qi_time_ratio'):
        assert any(f.startswith(f'results/figures/{fig}') for f in files), fig


@pytest.mark.parametrize('params,message', [
    ((('profile', 'fast'),), "parameter profile='fast' is invalid"),
    ((('sections', 'block,gpu'),), "parameter sections='gpu' is invalid"),
    ((('device', 'tpu'),), "parameter device='tpu' is invalid"),
])
def test_performance_bad_parameters_write_nothing(tmp_path, params, message):
    assert_refused('11_performance.ipynb', tmp_path, params, message)


def test_performance_one_section(tmp_path):
    r = run_nb('11_performance.ipynb', tmp_path / 'out.ipynb', tmp_path, ('sections', 'step'))
    assert r.returncode == 0, r.stderr[-3000:]
    files = written(tmp_path)
    assert [f for f in files if f.startswith('results/11_performance/')] and len(files) == 2, files
    result = json.loads((tmp_path / [f for f in files if f.endswith('.json')][0]).read_text())
    assert set(result['metrics']) == {'step', 'targets'}
    assert result['params']['sections'] == ['step'] and result['threads'] >= 1


def test_a_jupyterlab_save_leaves_committed_notebooks_unchanged(tmp_path, monkeypatch):
    "JupyterLab adds language_info and its own kernel display name on save; `make lab`'s nbdev hook cleans them off."
    import shutil
    from jupyter_server.services.contents.filemanager import FileContentsManager
    shutil.copy(ROOT / 'settings.ini', tmp_path / 'settings.ini')
    shutil.copytree(ROOT / 'nbs', tmp_path / 'nbs', ignore=shutil.ignore_patterns('.*', '_*'))
    monkeypatch.chdir(tmp_path / 'nbs')                                  # `make lab` runs JupyterLab in nbs/
    cm = FileContentsManager(root_dir=str(tmp_path / 'nbs'), pre_save_hook='nbdev.clean.clean_jupyter')
    for nb in sorted((tmp_path / 'nbs').glob('*.ipynb')):
        before = nb.read_text()
        model = cm.get(nb.name)
        model['content']['metadata']['kernelspec']['display_name'] = 'Python 3 (ipykernel)'
        model['content']['metadata']['language_info'] = {'name': 'python', 'version': '3.11.7'}
        cm.save(model, nb.name)
        assert nb.read_text() == before, nb.name
