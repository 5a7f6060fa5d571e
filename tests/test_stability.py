"""A verdict other than `inconclusive` must survive a rerun with other seed values and other float rounding. Each
finding runs at its quick defaults twice: seeds 0.. in one-thread workers, and seeds 100.. in one process with every
thread (other rounding). Rows the table calls robust (a rerun decides the same >= 80% of the time, `replicates`)
must keep their verdict; no row may flip between `reproduced` and `refuted`. Timing rows follow the machine's load,
not the seeds, and are left out. Slow (two quick runs per finding): `make stability`."""
import json

import pytest

from test_notebooks import run_nb
from vlm_lab.findings import POWER, verdict_changes

DECIDED = ('reproduced', 'refuted')
OTHER = {'05_fusion_depth.ipynb': (('seeds', '100,101,102,103,104'), ('side_seeds', '100,101,102,103,104')),
         '06_gradient_dilution.ipynb': (('seeds', '100,101,102,103,104'),
                                        ('grad_seeds', ','.join(str(s) for s in range(100, 108))))}


def quick_table(nb, root, *params):
    root.mkdir()
    r = run_nb(nb, root / 'out.ipynb', root, *params, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next((root / 'results').glob('*/*.json')).read_text())['verdicts']


@pytest.mark.slow
@pytest.mark.parametrize('nb', sorted(OTHER))
def test_verdicts_survive_other_seeds_and_rounding(tmp_path, monkeypatch, nb):
    monkeypatch.delenv('VLM_LAB_WORKERS', raising=False)
    a = quick_table(nb, tmp_path / 'a')                              # seeds 0.., one-thread workers
    monkeypatch.setenv('VLM_LAB_WORKERS', '1')                       # every thread in one process: other rounding
    b = quick_table(nb, tmp_path / 'b', *OTHER[nb])
    rows = {r['claim']: r for r in a + b if 'timing' not in r['noise']}
    robust = {r['claim'] for t in (a, b) for r in t if r['claim'] in rows and r['verdict'] in DECIDED
              and r['replicates'] is not None and r['replicates'] >= POWER}
    moved = verdict_changes(a, b)
    moved = moved[moved.claim.isin(rows)]
    print(f"\n{nb}: {len(robust)} robust verdicts; moved between the runs:\n{moved.to_string()}")
    contradictions = moved[moved.verdict_a.isin(DECIDED) & moved.verdict_b.isin(DECIDED)]
    assert contradictions.empty, contradictions
    assert not set(moved.claim) & robust, moved[moved.claim.isin(robust)]
