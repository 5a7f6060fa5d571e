"vlm_lab.findings: the verdict rules on constructed numbers whose verdict is known, the table, the grid, profiles."
import math

import numpy as np
import pytest
import torch

from vlm_lab.core import CI, mean_ci
from vlm_lab.findings import (CLAIMS, VerdictTable, bootstrap_ci, claims, get_claim, resolve_params, run_grid,
                              seeds_to_resolve, verdict_direction, verdict_equivalence, verdict_range)


def ci(mean, half, n=8): return CI(mean, mean - half, mean + half, n)


@pytest.mark.parametrize('c,sign,expected', [
    (ci(0.05, 0.01), 1, 'reproduced'), (ci(-0.05, 0.01), 1, 'refuted'), (ci(0.01, 0.05), 1, 'inconclusive'),
    (ci(-0.05, 0.01), -1, 'reproduced'), (ci(0.05, 0.01), -1, 'refuted'), (ci(0.0, 0.0, 1), 1, 'inconclusive'),
])
def test_direction(c, sign, expected):
    assert verdict_direction(c, sign) == expected


@pytest.mark.parametrize('c,rng,tol,expected', [
    (ci(0.04, 0.30), (0.03, 0.05), 0.0, 'inconclusive'),   # a wide CI around the claimed value: never reproduced
    (ci(0.164, 0.5), (0.164, 0.164), 0.0, 'inconclusive'),
    (ci(0.20, 0.01), (0.03, 0.05), 0.0, 'refuted'),        # a narrow CI outside the claim
    (ci(-0.02, 0.01), (0.03, 0.05), 0.0, 'refuted'),
    (ci(0.04, 0.005), (0.03, 0.05), 0.0, 'reproduced'),
    (ci(0.37, 0.05), (0.37, 0.37), 0.1, 'reproduced'),     # a claimed value with its stated tolerance
    (ci(0.37, 0.15), (0.37, 0.37), 0.1, 'inconclusive'),
    (ci(0.10, 0.02), (0.05, math.inf), 0.0, 'reproduced'), # an open range
    (ci(0.01, 0.02), (0.05, math.inf), 0.0, 'refuted'),
    (mean_ci([0.04]), (0.03, 0.05), 0.0, 'inconclusive'),  # one seed decides nothing
])
def test_range(c, rng, tol, expected):
    assert verdict_range(c, *rng, tol) == expected


def test_equivalence():
    assert verdict_equivalence(ci(0.0, 0.02), 0.05) == 'reproduced'
    assert verdict_equivalence(ci(-0.3, 0.02), 0.05) == 'refuted'
    assert verdict_equivalence(ci(0.03, 0.05), 0.05) == 'inconclusive'


def test_seeds_to_resolve():
    assert seeds_to_resolve([0.1, 0.1], [0.0]) == 2
    assert seeds_to_resolve([0.1, -0.1], [0.0]) is None
    x = [0.05, 0.0, 0.1, 0.02]                              # mean 0.0425, sd 0.04: t(n-1) * sd / sqrt(n) < 0.0425
    n = seeds_to_resolve(x, [0.0])
    assert 6 <= n <= 8 and verdict_direction(mean_ci(np.tile(x, 3)[:n]), 1) in ('reproduced', 'inconclusive')


def test_table_rows_follow_the_claims_kind():
    t = VerdictTable('FD')
    assert t.add('FD-2', [0.12, 0.11, 0.10, 0.12, 0.11]) == 'reproduced'     # inside +8.6..+13.6 pts
    assert t.add('FD-3', [0.0, 0.1, -0.05, 0.2]) == 'inconclusive'
    assert t.add('FD-9 same total steps', [0.05, 0.06, 0.04]) == 'refuted'   # warm better: "must retrain" refuted
    assert t.add('FD-1 overall accuracy', [0.5, 0.52, 0.51]) == 'measured'
    assert t.add('FD-9 loading', check=lambda: (True, 'identical'), agrees=False) == 'refuted'
    assert t.not_tested('FD-8', 'full profile only') == 'not tested'
    df = t.frame()
    assert list(df.claim) == ['FD-2', 'FD-3', 'FD-9 same total steps', 'FD-1 overall accuracy', 'FD-9 loading', 'FD-8']
    row = df.set_index('claim').loc['FD-3']
    assert row.n == 4 and row.lo < 0 < row.hi and 'seeds would decide' in row.why
    assert df.set_index('claim').loc['FD-2', 'measured'].endswith(' pts')
    rec = t.records()
    assert rec[0]['claim'] == 'FD-2' and set(rec[0]) >= {'note', 'measured', 'n', 'verdict', 'why', 'figure'}


def test_mechanism_must_hold():
    t = VerdictTable('FD')
    with pytest.raises(AssertionError, match='FD-9 loading'):
        t.add('FD-9 loading', check=lambda: (False, 'predictions differ by 0.3'))
    with pytest.raises(ValueError, match='check='):
        t.add('FD-9 loading', [1.0])
    with pytest.raises(KeyError, match='FD-77'):
        t.add('FD-77', [1.0])


def test_claims_are_data():
    assert {c.finding for c in CLAIMS} == {'FD', 'GD', 'QI', 'LU', 'PX'}
    assert get_claim('FD-2').value == (0.086, 0.136) and get_claim('FD-7 cached features').tolerance == 0.05
    assert len(claims('GD')) >= 9
    with pytest.raises(ValueError, match='no claims'):
        claims('XX')


def test_bootstrap_and_profiles():
    c = bootstrap_ci(np.r_[np.ones(30), np.zeros(70)])
    assert c.mean == 0.3 and c.lo < 0.3 < c.hi and c.n == 100
    with pytest.raises(ValueError, match='at least 2'):
        bootstrap_ci([1.0])
    P = {'quick': dict(seeds=6), 'full': dict(seeds=10)}
    assert resolve_params(dict(seeds=None), P, 'full') == dict(seeds=10)
    assert resolve_params(dict(seeds=3), P, 'full') == dict(seeds=3)


def _train(cond, seed):
    torch.manual_seed(seed)
    w = torch.randn(4, 4)
    return dict(v=float((w @ w).sum()) + cond['a'], state={'w': w})


def _measure(trained, cond, seed): return dict(v=trained['v'])


def test_grid_parallel_equals_sequential_and_keeps_state():
    conds = [dict(a=0.0), dict(a=2.0)]
    par = run_grid(conds, [3, 1, 2], _train, _measure, keep=lambda t: t['state'], workers=2, progress=False)
    seq = run_grid(conds, [3, 1, 2], _train, _measure, workers=1, progress=False)
    assert par.runs[['a', 'seed', 'v']].equals(seq.runs[['a', 'seed', 'v']])
    assert par.runs.seed.tolist() == [1, 2, 3, 1, 2, 3]                       # sorted by condition, then seed
    assert par.paired('v', dict(a=0.0), dict(a=2.0)).tolist() == [2.0, 2.0, 2.0]
    torch.manual_seed(2)
    assert torch.equal(par.kept[(1, 2)]['w'], torch.randn(4, 4))
    assert par.workers == 2 and seq.workers == 1


def test_grid_errors_are_named():
    def bad_measure(trained, cond, seed): return 1.0
    with pytest.raises(TypeError, match='measure must return a dict'):
        run_grid([dict(a=1)], [0], _train, bad_measure, workers=1, progress=False)
    with pytest.raises(ValueError, match='seed'):
        run_grid([dict(a=1)], [-1], _train, _measure, workers=1, progress=False)
