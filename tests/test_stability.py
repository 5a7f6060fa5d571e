"""A verdict other than `inconclusive` must survive a rerun with other seed values and other float rounding. Every
finding runs at its quick defaults twice: seeds 0.. in one-thread workers, and seeds 100.. in one process with every
thread (other rounding). No row may flip between `reproduced` and `refuted`, and the rows the tables call robust (at
least 8 samples and an estimated replication of 80% or more; in simulation such rows replicate about 85% of the
time) must mostly keep their verdict: at least 70% of them over the findings. Timing rows follow the machine's load,
not the seeds, and are left out. Slow (two quick runs per finding, about 25 minutes): `make stability`."""
import json

import pandas as pd
import pytest

from test_notebooks import run_nb
from vlm_lab.findings import robust, verdict_changes

DECIDED = ('reproduced', 'refuted')
seeds = lambda n: ','.join(str(100 + i) for i in range(n))
OTHER = {'05_fusion_depth.ipynb': (('seeds', seeds(8)), ('side_seeds', seeds(5))),
         '06_gradient_dilution.ipynb': (('seeds', seeds(8)), ('grad_seeds', seeds(8))),
         '07_query_init.ipynb': (('seeds', seeds(8)), ('side_seeds', seeds(5)), ('init_seeds', seeds(8))),
         '08_lora_vs_unfreeze.ipynb': (('seeds', seeds(5)),),
         '09_prefix_vs_cross_attention.ipynb': (('seeds', seeds(5)),)}


def quick_table(nb, root, *params):
    root.mkdir(parents=True)
    r = run_nb(nb, root / 'out.ipynb', root, *params, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next((root / 'results').glob('*/*.json')).read_text())['verdicts']


@pytest.mark.slow
def test_verdicts_survive_other_seeds_and_rounding(tmp_path, monkeypatch):
    report = []
    for nb, other in OTHER.items():
        monkeypatch.delenv('VLM_LAB_WORKERS', raising=False)
        a = quick_table(nb, tmp_path / nb / 'a')                     # seeds 0.., one-thread workers
        monkeypatch.setenv('VLM_LAB_WORKERS', '1')                   # every thread in one process: other rounding
        b = quick_table(nb, tmp_path / nb / 'b', *other)
        seeded = {r['claim'] for r in a + b if 'timing' not in r['noise']}
        moved = verdict_changes(a, b).set_index('claim')
        for t, run in ((a, 'a'), (b, 'b')):
            for r in t:
                if r['claim'] in seeded and robust(r):
                    report.append(dict(notebook=nb, run=run, claim=r['claim'], verdict=r['verdict'],
                                       kept=r['claim'] not in moved.index))
        flips = moved[moved.verdict_a.isin(DECIDED) & moved.verdict_b.isin(DECIDED)]
        print(f"\n{nb}: moved between the runs:\n{moved.to_string()}")
        assert flips.empty, f"{nb}: verdicts flipped between reproduced and refuted:\n{flips}"
    report = pd.DataFrame(report)
    print(report.to_string(), f"\nrobust verdicts kept: {report.kept.mean():.0%} of {len(report)}")
    assert len(report) and report.kept.mean() >= 0.7, report
