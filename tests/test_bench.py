"""vlm_lab.bench beyond the asserts of 11_performance: the `vlm_lab` command, bad benchmark names, and the
targets table on a real (small) run (the `vlm_lab` console script itself: tests/test_experiments.py)."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from vlm_lab.bench import (INCONCLUSIVE, BlockCase, bench_block, bench_growth, bench_step, geomean_ci, growth_fit,
                           main, predict_epoch_time, target_met, targets)


def test_bench_command_prints_tables_and_targets(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv('VLM_LAB_ROOT', str(tmp_path))
    assert main(['bench', '--only', 'step', '--no-save', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert '== step ==' in out and '== targets ==' in out
    assert 'training step, best variant over eager' in out
    assert not (tmp_path / 'results').exists()


@pytest.mark.parametrize('variant', ['batch x0', 'batch xfour', 'fused', 'Eager'])
def test_unknown_step_variant_is_named(variant):
    with pytest.raises(ValueError, match=f"step variant '{variant}' is unknown"):
        bench_step([variant], steps=1)


def test_gpu_only_variants_are_skipped_on_cpu_not_failed():
    t = bench_step(['eager', 'compile reduce-overhead'], steps=2, device='cpu')
    assert t.set_index('variant').loc['compile reduce-overhead', 'skipped'].startswith('needs a CUDA device')
    assert targets(dict(step=t)).set_index('benchmark').loc['training step, best variant over eager', 'met'] == 'n/a'


def test_growth_rejects_unknown_axis():
    with pytest.raises(ValueError, match="axis='depth'"):
        bench_growth({'depth': [1, 2]})


def test_block_bench_rows_are_consistent():
    t = bench_block([BlockCase(32, 4, 9, 2, heads=2, dim_head=16)], repeats=2, min_time=0.01, progress=False)
    r = t.iloc[0]
    assert r.parity < 1e-4
    assert r.lab_frac_peak == pytest.approx(r.lab_tflops / r.peak_tflops)
    assert r.speedup_lo <= r.speedup <= r.speedup_hi and r.lab_frac_peak_lo <= r.lab_frac_peak_hi
    row = targets(dict(block=t)).iloc[0]
    assert row.met in ('yes', 'no', INCONCLUSIVE) and row.note == "CI: the case's interleaved repeats"


def test_block_bench_bf16_path_runs_on_cpu():
    "The bf16 rows a GPU run adds go through the same parity check; on CPU they are slow but must agree."
    t = bench_block([BlockCase(32, 4, 9, 2, heads=2, dim_head=16)], dtype=torch.bfloat16, repeats=2, min_time=0.01,
                    progress=False)
    r = t.iloc[0]
    assert r['dtype'] == 'bfloat16' and 0 < r.parity < 5e-2        # bf16 rounding shows, within the asserted bound


def test_cpu_capable_step_variants_run_on_cpu():
    t = bench_step(['eager', 'fused AdamW', 'bf16 autocast'], steps=2, device='cpu').set_index('variant')
    assert t.samples_per_s.notna().all() and 'skipped' not in t
    assert (t.speedup_lo <= t.speedup).all() and (t.speedup <= t.speedup_hi).all()


@pytest.mark.parametrize('mean,lo,hi,met', [(3.3, 2.6, 3.6, INCONCLUSIVE), (3.3, 3.1, 3.6, 'yes'),
                                             (2.5, 2.2, 2.8, 'no')])
def test_gpu_step_target_needs_the_whole_interval(mean, lo, hi, met):
    "A mean of 3.3x whose interval dips below 3x is not a met target: the verdict must survive a rerun."
    t = pd.DataFrame([dict(variant='eager', device='cuda', speedup=1.0, speedup_lo=1.0, speedup_hi=1.0),
                      dict(variant='compile', device='cuda', speedup=mean, speedup_lo=lo, speedup_hi=hi)])
    row = targets(dict(step=t)).set_index('benchmark').loc['training step, best variant over eager']
    assert row.met == met and f'{mean:.2f}x' in row.measured


@pytest.mark.parametrize('lo,hi,upper,met', [
    (1.3, 1.9, False, 'yes'), (1.2, 1.9, False, 'yes'), (1.1, 1.9, False, INCONCLUSIVE), (0.8, 1.1, False, 'no'),
    (-np.inf, np.inf, False, INCONCLUSIVE), (2.0, 2.9, True, 'yes'), (2.5, 3.5, True, INCONCLUSIVE),
    (3.2, 4.0, True, 'no'), (np.nan, np.nan, False, 'n/a: no interval')])
def test_target_met_needs_the_whole_interval_on_the_right_side(lo, hi, upper, met):
    "Against 1.2 ('≥') or 3.0 ('≤', upper): met only when the whole CI clears the target."
    assert target_met(lo, hi, 3.0 if upper else 1.2, upper=upper) == met


def _block(*speedups, device='cpu', dtype='float32', **extra):
    return pd.DataFrame(dict(device=device, dtype=dtype, speedup=list(speedups)) | dict(dim=256, batch=8, text=16,
                                                                                       vision=65) | extra)


@pytest.mark.parametrize('speedups,met', [((1.0, 1.6, 1.1, 1.5), INCONCLUSIVE), ((1.5, 1.6, 1.45, 1.55), 'yes'),
                                          ((0.9, 1.0, 0.95, 1.05), 'no')])
def test_block_target_is_judged_on_the_geometric_mean_ci(speedups, met):
    row = targets(dict(block=_block(*speedups))).iloc[0]
    logs = np.log(speedups)
    h = stats.t.ppf(0.975, len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs))   # reference t-interval of the logs
    ci = geomean_ci(speedups)
    assert ci.mean == pytest.approx(np.exp(logs.mean())) and ci.n == len(speedups)
    assert (ci.lo, ci.hi) == pytest.approx((np.exp(logs.mean() - h), np.exp(logs.mean() + h)))
    assert row.met == met and f'95% CI {ci.lo:.2f} to {ci.hi:.2f}' in row.measured


def test_pipeline_ci_straddling_the_target_is_not_met():
    "The run that printed '23.9x (95% CI -25.5-73.2) ... met: yes'."
    pipe = lambda lo, hi: pd.DataFrame([dict(speedup=23.9, speedup_lo=lo, speedup_hi=hi, cache_build_s_per_1k=1.0)])
    assert targets(dict(pipeline=pipe(-25.5, 73.2))).met.iloc[3] == INCONCLUSIVE
    assert targets(dict(pipeline=pipe(6.0, 40.0))).met.iloc[3] == 'yes'


def test_gpu_fraction_of_peak_is_judged_on_its_ci():
    big = lambda lo, hi: _block(2.5, device='cuda', dtype='bfloat16', dim=1024, batch=64, text=64, vision=257,
                                speedup_lo=2.2, speedup_hi=2.8, lab_frac_peak=0.41, peak_tflops=900.0,
                                lab_frac_peak_lo=lo, lab_frac_peak_hi=hi)
    t = lambda lo, hi: targets(dict(block=big(lo, hi))).set_index('benchmark').met
    name = 'fusion block, GPU bf16 fraction of matmul peak (d1024 B64 L64 N257)'
    assert t(0.35, 0.47)[name] == INCONCLUSIVE and t(0.40, 0.42)[name] == 'yes' and t(0.30, 0.38)[name] == 'no'
    assert t(0.40, 0.42)['fusion block vs flamingo-pytorch, cuda bfloat16'] == 'yes'     # one case: its repeats' CI


def test_seeds_row_is_a_single_measurement_not_a_met_target():
    s = pd.DataFrame([dict(way='2 parallel workers', seeds=2, epochs=2, projected_min=1.0)])
    row = targets(dict(seeds=s)).iloc[4]
    assert row.met == 'n/a: a single measurement' and 'no repeats' in row.note and '1.0 min' in row.measured


def _noisy_growth(seeds, slope=0.8, values=(1, 2, 4, 8, 16), sd=0.1):
    "Per seed an axis of cost = 3 * value^slope * lognormal noise."
    rows = []
    for s in seeds:
        noise = np.random.default_rng(s).normal(0, sd, len(values))
        rows += [dict(axis=f'a{s}', value=v, epoch_s=3 * v ** slope * np.exp(e)) for v, e in zip(values, noise)]
    return pd.DataFrame(rows)


def test_growth_exponent_interval_covers_the_true_slope():
    fit = growth_fit(_noisy_growth(range(400)))
    assert (fit.n == 5).all() and (fit.lo < fit.exponent).all() and (fit.exponent < fit.hi).all()
    covered = ((fit.lo <= 0.8) & (0.8 <= fit.hi)).mean()
    assert 0.92 <= covered <= 0.98, covered     # a 95% interval (a normal quantile on 3 dof covers about 87%)
    one = _noisy_growth([0]).assign(axis='layers')
    f = growth_fit(one).loc['layers']
    assert f.lo <= 0.8 <= f.hi
    row = targets(dict(growth=one)).iloc[-1]
    assert row.measured == f"∝ layers^{f.exponent:.2f} (95% CI {f.lo:.2f} to {f.hi:.2f})" and row.met == 'n/a'
    two = one[one.value <= 2]
    assert targets(dict(growth=two)).measured.iloc[-1].endswith('(95% CI not available: 2 points)')
    base = dict(layers=4, samples=1, width=1, vision_tokens=1)
    assert predict_epoch_time(one, base, layers=8) == pytest.approx(one.epoch_s.iloc[2] * 2 ** f.exponent)
