"""`vlm_lab run` / `reproduce` / `ledger` on a finding-like notebook that runs in seconds (tests/fixtures/toy_finding):
bad parameters refused before anything is written, runs skipped when their result exists, a killed sweep resumed, a
code change rerun, a failure reported while the other runs finish, the Dask executor, a ledger row for every claim.
Results, runs and the ledger go under a throw-away root (the `lab_root` fixture)."""
import importlib.metadata, json, os, shutil, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

from vlm_lab import experiments as ex
from vlm_lab.claims import CLAIMS

FIXTURES = Path(__file__).parent / 'fixtures'


@pytest.fixture
def toy(lab_root, monkeypatch):
    "A notebooks folder holding the toy finding (its Params module importable here and in its kernel)."
    nbs = lab_root / 'toy_nbs'
    shutil.copytree(FIXTURES, nbs)
    monkeypatch.syspath_prepend(str(nbs))
    return nbs


def registry(*points):
    "A findings registry of the toy notebook alone, sweeping `points` (the first: the canonical run)."
    return {'toy_finding': dict(finding='FD', title='toy', params='toy_finding:ToyParams', quick=list(points),
                                full=list(points))}


def sweep(toy, *points, **kw):
    return ex.reproduce(findings=registry(*points), nbs=toy, progress=False, **kw)


def test_sweep_reports_a_failure_skips_resumes_and_reruns_on_a_code_change(toy, lab_root):
    t = sweep(toy, {}, {'effect': 0.2}, {'fail': True}, workers=2)
    assert list(t.status) == ['done', 'done', 'failed'], t
    bad = t.iloc[2]
    assert bad.error.startswith('cell In [') and 'RuntimeError: the toy run fails on purpose' in bad.error
    assert Path(bad.executed).is_file() and not Path(bad.result).exists()
    assert t.verdicts[1] == '1 reproduced, 1 refuted'                              # effect 0.2: above 3-5 points
    results = sorted((lab_root / 'results' / 'toy_finding').glob('*.json'))
    assert sorted(map(str, results)) == sorted(t.result[:2])
    code = ex.code_version(toy / 'toy_finding.ipynb')
    assert all(json.loads(p.read_text())['code_version'] == code for p in results)
    assert all(json.loads(p.read_text())['threads'] == max(1, (os.cpu_count() or 1) // 2) for p in results)

    ok = (toy, {}, {'effect': 0.2})
    stamp = {p: p.stat().st_mtime_ns for p in results}
    assert list(sweep(*ok, ledger=False).status) == ['skipped', 'skipped']          # a second call runs nothing
    assert {p: p.stat().st_mtime_ns for p in results} == stamp

    Path(t.result[1]).unlink()                                                     # a sweep killed before run 2
    assert list(sweep(*ok, ledger=False).status) == ['skipped', 'done']

    nb = toy / 'toy_finding.ipynb'
    cells = json.loads(nb.read_text())
    cells['cells'][-1]['source'].append('\n# a code change')
    nb.write_text(json.dumps(cells))
    assert list(sweep(*ok, ledger=False).status) == ['done', 'done']                # a code change reruns


def test_ledger_has_a_row_for_every_claim(toy, lab_root):
    t = ex.write_ledger(findings=registry({}), nbs=toy)                             # no result yet
    assert list(t.claim) == [c.key for c in CLAIMS]
    assert set(t.verdict) == {'not tested'} and set(t.why) == {'no result yet'}
    sweep(toy, {})                                                                  # the canonical run, then the ledger
    folder = lab_root / 'figures'
    assert sorted(p.name for p in folder.iterdir()) == ['FINDINGS.md', 'findings.csv', 'findings_verdicts.png']
    t = pd.read_csv(folder / 'findings.csv', keep_default_na=False).set_index('claim')
    assert {c.id for c in CLAIMS} == {k.split(' ')[0] for k in t.index}
    assert t.loc['FD-3 direction', 'verdict'] == 'reproduced' and t.loc['FD-3 direction', 'n'] == '5'
    assert t.loc['FD-3 direction', 'figure'] == '../results/figures/toy_effect.png'
    assert (folder / t.loc['FD-3 direction', 'result']).is_file()
    assert t.loc['FD-3 direction', 'torch'] and t.loc['FD-3 direction', 'profile'] == 'quick'
    assert t.loc['FD-2 size', 'why'] == 'the canonical run has no row for it'
    assert t.loc['GD-1 size', 'verdict'] == 'not tested' and t.loc['GD-1 size', 'why'] == 'no result yet'
    n = t[t.finding == 'FD'].verdict.value_counts()
    md = (folder / 'FINDINGS.md').read_text()
    assert f"| FD | 1 | {n.get('refuted', 0)} | {n.get('inconclusive', 0)} | 0 | 0 | {n['not tested']} |" in md
    assert '| GD-9 | ' in md and md.count('\n| FD-') == sum(c.finding == 'FD' for c in CLAIMS)


def test_dask_executor_runs_the_sweep(toy, lab_root):
    distributed = pytest.importorskip('dask.distributed')
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c, \
            distributed.Client(c) as client:
        t = sweep(toy, {'effect': 0.3}, {'effect': 0.4}, executor=client.get_executor(), ledger=False)
    assert list(t.status) == ['done', 'done'], t
    assert all(json.loads(Path(p).read_text())['code_version'] for p in t.result)


@pytest.mark.parametrize('notebook', list(ex.FINDINGS))
def test_papermill_reads_every_parameter_of_a_finding(notebook):
    "A parameters-cell line papermill cannot parse (a quote in its comment) would drop that parameter from `-p`."
    import papermill as pm
    cell = pm.inspect_notebook(str(ex.find_notebook(notebook)))
    assert sorted(cell) == sorted(ex.params_class(notebook).names())


SLOW_SWEEP = """
import sys
from vlm_lab import experiments as ex
if __name__ == '__main__':
    points = [{'sleep': 120.0}, {'sleep': 121.0}]
    reg = {'toy_finding': dict(finding='FD', title='toy', params='toy_finding:ToyParams', quick=points, full=points)}
    ex.reproduce(findings=reg, nbs=sys.argv[1], workers=2, progress=False, ledger=False)
"""


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGKILL'])
def test_a_killed_sweep_leaves_no_worker_or_kernel_running(toy, lab_root, sig):
    import signal, time
    psutil = pytest.importorskip('psutil')
    (lab_root / 'sweep.py').write_text(SLOW_SWEEP)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(toy), os.environ.get('PYTHONPATH', '')])}
    parent = subprocess.Popen([sys.executable, str(lab_root / 'sweep.py'), str(toy)], env=env, cwd=lab_root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kernels = lambda: [p for p in psutil.Process(parent.pid).children(recursive=True)
                       if 'ipykernel_launcher' in ' '.join(p.cmdline())]
    deadline = time.time() + 120
    while len(kernels()) < 2 and time.time() < deadline: time.sleep(0.5)
    family = psutil.Process(parent.pid).children(recursive=True)
    assert len(kernels()) == 2 and len(family) >= 4, family        # two workers, each running its kernel
    parent.send_signal(getattr(signal, sig))
    parent.wait(60)
    gone, alive = psutil.wait_procs(family, timeout=60)
    assert alive == [], alive
    assert not (lab_root / 'results' / 'toy_finding').exists()         # an interrupted run leaves no result


@pytest.mark.parametrize('argv,message', [
    (['run', '05', '-p', 'layer', '4'], 'unknown parameter(s) layer for 05_fusion_depth: it takes layers, '),
    (['run', '05', '-p', 'layers', '0'], 'parameter layers=0 is invalid'),
    (['run', '05_fusion_depth', '--profile', 'full', '-p', 'layers', '2'], 'expected more than baseline_layers=2'),
    (['reproduce', '--only', '99'], "parameter only='99' is invalid"),
])
def test_bad_input_is_one_line_and_writes_nothing(lab_root, capsys, argv, message):
    assert ex.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert list(lab_root.iterdir()) == []


def test_run_command_prints_verdicts_and_paths_or_the_failing_cell(toy, lab_root):
    env = {**os.environ, 'VLM_LAB_ROOT': str(lab_root), 'PYTHONPATH': os.pathsep.join(sys.path)}
    cmd = [sys.executable, '-m', 'vlm_lab.experiments', 'run', str(toy / 'toy_finding.ipynb')]
    r = subprocess.run([*cmd, '-p', 'effect', '0.2'], capture_output=True, text=True, env=env, cwd=lab_root,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'FD-3 direction' in r.stdout and '1 reproduced, 1 refuted' in r.stdout
    out = next((lab_root / 'runs').glob('toy_finding__*.ipynb'))
    assert f"  {out.relative_to(lab_root)}" in r.stdout
    assert f"  {next((lab_root / 'results' / 'toy_finding').glob('*.json')).relative_to(lab_root)}" in r.stdout
    r = subprocess.run([*cmd, '-p', 'fail', 'True'], capture_output=True, text=True, env=env, cwd=lab_root, timeout=300)
    assert r.returncode == 1
    assert 'failed at cell In [' in r.stderr and 'RuntimeError: the toy run fails on purpose' in r.stderr
    assert 'executed notebook: runs/toy_finding__' in r.stderr


def test_console_script_is_the_experiments_main():
    "pyproject's `vlm_lab` command is this module's main (an editable install made before needs `pip install -e .`)."
    tomllib = pytest.importorskip('tomllib')                                        # Python 3.11+
    scripts = tomllib.loads((Path(__file__).parents[1] / 'pyproject.toml').read_text())['project']['scripts']
    assert importlib.metadata.EntryPoint('vlm_lab', scripts['vlm_lab'], 'console_scripts').load() is ex.main


def test_bench_goes_to_its_own_command(capsys):
    with pytest.raises(SystemExit) as e: ex.main(['bench', '--only', 'gpu'])
    assert e.value.code == 2 and "sections='gpu'" in capsys.readouterr().err


def test_publish_writes_the_notebooks_back_with_their_outputs_and_a_summary(toy, lab_root):
    nb = toy / 'toy_finding.ipynb'
    reg = registry({}, {'effect': 0.2})
    stale = lab_root / 'figures' / 'stale_figure.png'
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b'no run writes this any more')
    sweep(toy, {}, {'effect': 0.2}, ledger=False)                                  # both results exist
    t = ex.reproduce(findings=reg, nbs=toy, progress=False, publish=True)
    assert list(t.status) == ['done', 'skipped'] and list(t.published) == ['updated', '']   # canonical run: rerun
    cells = json.loads(nb.read_text())['cells']
    assert [c['id'] for c in cells[:2]] == ['toy00000', ex.SUMMARY_ID]
    summary = ''.join(cells[1]['source'])
    assert f"**Verdicts**: {ex.verdict_counts(t.result[0])}." in summary and 'reproduced' in summary
    assert '| FD-3 direction | +3 to +5 pts |' in summary and '**Tested**: 2 verdict rows on claims FD-3' in summary
    outputs = [o for c in cells if c['cell_type'] == 'code' for o in c['outputs']]
    text = nb.read_text()
    assert outputs and str(lab_root) not in text and '/tmp/' not in text
    assert not [o for o in outputs if o.get('name') == 'stderr']
    assert any('saved results/toy_finding/' in ''.join(o.get('text', '')) for o in outputs)
    assert not stale.exists() and (lab_root / 'figures' / 'FINDINGS.md').is_file()  # a figure no run wrote: gone
    ledger = pd.read_csv(lab_root / 'figures' / 'findings.csv', keep_default_na=False).set_index('claim')
    kept = lab_root / 'figures' / ledger.loc['FD-3 direction', 'result']         # the result, committed beside it
    assert kept.parent == lab_root / 'figures' / 'results' and json.loads(kept.read_text())['verdicts']
    before = text
    t = ex.reproduce(findings=reg, nbs=toy, progress=False, publish=True)
    assert list(t.published) == ['unchanged', ''] and nb.read_text() == before      # same result: same file


def test_ledger_marks_rows_whose_versions_differ_from_the_lock(tmp_path):
    lock = tmp_path / 'requirements.lock'
    lock.write_text("# via pip-compile\ntorch==2.13.0+cpu \\\n    --hash=sha256:ab\nPEFT==0.21.2 \\\n    --hash=sha256:cd\n"
                    "transformers==5.24.0 ; python_version >= '3.10' \\\n    --hash=sha256:ef\n")
    pins = ex.lock_versions(lock)
    assert pins == {'torch': '2.13.0+cpu', 'peft': '0.21.2', 'transformers': '5.24.0'}
    assert ex.off_lock({'torch': '2.13.0', 'peft': '0.21.2', 'transformers': '5.24.0', 'accelerate': '1.0'}, pins) == ''
    assert ex.off_lock({'peft': '0.22.0', 'transformers': None}, pins) == 'peft 0.22.0 (lock 0.21.2)'
    assert ex.lock_versions(tmp_path / 'none.lock') == {}
    repo = ex.lock_versions(Path(__file__).parents[1] / 'requirements.lock')      # the lab's own lock
    assert {'torch', 'transformers', 'peft', 'accelerate'} <= set(repo)
