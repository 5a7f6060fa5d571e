"""vlm_lab.findings: the verdict rules tested by simulation on data whose truth is known, the table's adders, typed
parameters, the named experiment grid."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from vlm_lab.claims import CLAIMS, claims, get_claim
from vlm_lab.core import CI, mean_ci
from vlm_lab.findings import (MIN_SAMPLES, Params, VerdictTable, bootstrap_ci, claim_verdict, decide_power, param,
                              run_grid, seeds_to_resolve, simulate_rules, verdict_changes)


def rates(claim, mean, sd, n, draws=4000, seed=0):
    "Share of each verdict of `claim` over `draws` normal samples of size n."
    rng = np.random.default_rng(seed)
    v = pd.Series([claim_verdict(claim, mean_ci(rng.normal(mean, sd, n))) for _ in range(draws)])
    return v.value_counts(normalize=True).reindex(['reproduced', 'refuted', 'inconclusive'], fill_value=0.0)


@pytest.mark.parametrize('n', [5, 10])
def test_no_effect_rarely_decides(n):
    r = simulate_rules(n, effect=0.0, draws=8000, seed=n)
    assert r['decided'] <= 0.06 and r['reproduced'] <= 0.035 and r['refuted'] <= 0.035, r
    heavy = np.random.default_rng(n).standard_t(3, size=(8000, n))            # heavy tails: the t interval holds
    decided = np.mean([claim_verdict(get_claim('FD-3 direction'), mean_ci(x)) != 'inconclusive' for x in heavy])
    assert decided <= 0.06


@pytest.mark.parametrize('n', [5, 10])
def test_interval_covers_the_truth(n):
    assert abs(simulate_rules(n, effect=0.3, draws=8000, seed=100 + n)['coverage'] - 0.95) < 0.01


def test_one_sd_effect_is_found_at_ten():
    assert simulate_rules(10, effect=1.0, draws=8000, seed=7)['reproduced'] > 0.7
    assert simulate_rules(10, effect=-1.0, draws=8000, seed=8)['refuted'] > 0.7


def test_below_five_samples_never_decides():
    c = get_claim('FD-3 direction')
    assert rates(c, 5.0, 1.0, 4, draws=500)['inconclusive'] == 1.0            # even a 5 SD effect
    assert claim_verdict(c, mean_ci([0.01, 0.01])) == 'inconclusive'        # zero spread
    assert claim_verdict(c, CI(0.2, 0.2, 0.2, 50)) == 'inconclusive'


def test_range_claim_with_a_wide_interval_is_inconclusive():
    size = get_claim('FD-3 size')                                           # 3-5 points
    wide = rates(size, 0.04, 0.05, 5)                                       # true value inside, noise 10x the range
    assert wide['reproduced'] < 0.01 and wide['refuted'] < 0.03
    assert rates(size, 0.04, 0.002, 10)['reproduced'] > 0.95
    at_edge = rates(size, 0.05, 0.004, 10)                                  # truth on the boundary
    assert at_edge['reproduced'] < 0.5 and at_edge['refuted'] <= 0.03


def test_equivalence_at_the_margin_rarely_reproduces():
    gate = get_claim('FD-5 gate')                                           # margin 0.05
    for n in (5, 10):
        assert rates(gate, 0.05, 0.02, n)['reproduced'] <= 0.035


@pytest.mark.parametrize('mean,sd', [(0.5, 1.0), (0.2, 0.3), (-0.8, 1.0)])
def test_seeds_to_resolve_gives_eighty_percent_power(mean, sd):
    c = get_claim('FD-3 direction')
    x = np.random.default_rng(0).normal(size=20)
    x = mean + sd * (x - x.mean()) / x.std(ddof=1)                          # observed mean and sd exactly
    n = seeds_to_resolve(x, c)
    assert n >= MIN_SAMPLES
    decided = 1 - rates(c, mean, sd, n, draws=3000, seed=3)['inconclusive']
    assert 0.76 < decided < 0.84, (n, decided)
    if n > MIN_SAMPLES:
        assert 1 - rates(c, mean, sd, n - 1, draws=3000, seed=4)['inconclusive'] < 0.8 + 0.03


def test_power_is_exact_for_a_normal_sample():
    sim = 1 - rates(get_claim('FD-3 size'), 0.04, 0.004, 8, draws=6000, seed=5)['inconclusive']
    assert abs(decide_power(0.04, 0.004, 8, 0.03, 0.05) - sim) < 0.02


def test_table_adders(lab_root):
    t = VerdictTable('FD', noise='constructed')
    assert t.add_values('FD-2 direction', [0.05, 0.06, 0.04, 0.05, 0.055]) == 'reproduced'
    assert t.add_values('FD-2 size', [0.05, 0.06, 0.04, 0.05, 0.055]) == 'refuted'   # rises, by less than claimed
    assert t.add_exact('FD-6', {'a': 9e6, 'b': 11e6}) == 'mechanism'
    assert t.add_check('FD-9 loading', lambda: (False, 'predictions differ')) == 'mechanism'   # "cannot load" holds
    assert t.add_values('FD-1 overall accuracy', [0.5, 0.52]) == 'measured'
    assert t.add_values('FD-8', [1.0], needs={'the grid': False}) == 'not tested'
    df = t.frame().set_index('claim')
    assert df.loc['FD-2 size', 'noise'] == 'constructed' and df.loc['FD-6', 'noise'] == 'exact'
    assert df.loc['FD-6', 'measured'] == '9.0M (a); 11.0M (b)'
    saved = json.loads(t.save('05_fusion_depth', dict(layers=4), dict(x=1.0), wall_time=1.0).read_text())
    assert saved['claims'] == ['FD-1', 'FD-2', 'FD-6', 'FD-8', 'FD-9'] and len(saved['verdicts']) == 6
    with pytest.raises(KeyError, match='FD-77'):
        t.add_values('FD-77', [1.0])
    with pytest.raises(ValueError, match='use add_exact'):
        VerdictTable('FD').add_check('FD-6', lambda: (True, ''))


def test_save_records_the_whole_run_and_its_workers(lab_root, monkeypatch):
    from dataclasses import dataclass
    import time

    @dataclass
    class Q(Params):
        width: int = param(8, min=1)

    p = Q.resolve()
    time.sleep(0.05)
    monkeypatch.setenv('VLM_LAB_WORKERS', '2')
    t = VerdictTable('FD')
    t.add_exact('FD-6', 20e6)
    saved = json.loads(t.save('05_fusion_depth', p, dict(x=1.0)).read_text())
    assert saved['params'] == dict(profile='quick', width=8) and saved['workers'] == 2
    assert saved['wall_time_s'] >= 0.05                                    # from the parameters to the save


def test_exact_alternatives_that_disagree_are_inconclusive():
    t = VerdictTable('FD')
    assert t.add_exact('FD-6', {'ff x4': 21e6, 'ff x1': 8.4e6}) == 'inconclusive'
    assert VerdictTable('FD').add_exact('FD-6', 21e6) == 'refuted'


def test_verdict_changes_lists_what_moved():
    a, b = VerdictTable('FD'), VerdictTable('FD')
    a.add_values('FD-3 direction', [0.05, 0.06, 0.04, 0.05, 0.055])
    b.add_values('FD-3 direction', [0.05, -0.06, 0.04, 0.0, 0.055])
    for t in (a, b): t.add_exact('FD-6', 20e6)
    assert verdict_changes(a.records(), b.records()).claim.tolist() == ['FD-3 direction']


def test_claims_are_data():
    assert {c.finding for c in CLAIMS} == {'FD', 'GD', 'QI', 'LU', 'PX'}
    assert [c.kind for c in CLAIMS if c.id == 'FD-3'] == ['direction', 'range']
    assert get_claim('GD-6').kind == 'measured'                            # a norm is in the loss's units
    assert len(claims('GD')) >= 10
    with pytest.raises(ValueError, match='no claims'):
        claims('XX')


def test_bootstrap_ci():
    c = bootstrap_ci(np.r_[np.ones(30), np.zeros(70)])
    assert c.mean == 0.3 and c.lo < 0.3 < c.hi and c.n == 100
    with pytest.raises(ValueError, match='at least 2'):
        bootstrap_ci([1.0])


def test_params_types_and_profiles():
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass
    class Q(Params):
        PROFILES: ClassVar = {'quick': dict(seeds=2), 'full': dict(seeds=10)}
        seeds: list[int] = param(None, count=True)
        width: int = param(64, min=8)
        gate: bool = param(True)

    assert Q.resolve(profile='full').seeds == list(range(10))
    assert Q.resolve(seeds='3,4', width=16.0).asdict() == dict(profile='quick', seeds=[3, 4], width=16, gate=True)
    for bad, msg in ((dict(width=4), 'width=4'), (dict(gate='yes'), "gate='yes'"), (dict(sed=1), "['sed']"),
                     (dict(seeds=0), 'seeds=0')):
        with pytest.raises(ValueError, match=msg):
            Q.resolve(**bad)


def _train(cond, seed):
    torch.manual_seed(seed)
    w = torch.randn(4, 4)
    return dict(v=float((w @ w).sum()) + cond['a'], state={'w': w})


def _measure(trained, cond, seed): return dict(v=trained['v'])


def test_grid_parallel_equals_sequential_and_keeps_state():
    conds = {'base': dict(a=0.0), 'plus': dict(a=2.0)}
    par = run_grid(conds, [3, 1, 2], _train, _measure, keep=lambda t: t['state'], workers=2, progress=False)
    seq = run_grid(conds, [3, 1, 2], _train, _measure, workers=1, progress=False)
    assert par.runs[['condition', 'a', 'seed', 'v']].equals(seq.runs[['condition', 'a', 'seed', 'v']])
    assert par.runs.seed.tolist() == [1, 2, 3, 1, 2, 3]                       # by condition, then seed
    assert par.paired('v', 'base', 'plus').tolist() == [2.0, 2.0, 2.0]
    torch.manual_seed(2)
    assert torch.equal(par.kept['plus', 2]['w'], torch.randn(4, 4))
    assert par.workers == 2 and seq.workers == 1


def test_grid_errors_are_named():
    def bad_measure(trained, cond, seed): return 1.0
    with pytest.raises(TypeError, match='measure must return a dict'):
        run_grid({'x': dict(a=1)}, [0], _train, bad_measure, workers=1, progress=False)
    with pytest.raises(ValueError, match='seed'):
        run_grid({'x': dict(a=1)}, [-1], _train, _measure, workers=1, progress=False)
