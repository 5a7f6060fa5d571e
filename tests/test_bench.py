"""vlm_lab.bench beyond the asserts of 11_performance: the `vlm_lab` command, bad benchmark names, and the
targets table on a real (small) run."""
import importlib.metadata

import pandas as pd
import pytest
import torch

from vlm_lab.bench import BlockCase, bench_block, bench_growth, bench_step, main, targets


def test_console_script_is_main():
    eps = [e for e in importlib.metadata.entry_points(group='console_scripts') if e.name == 'vlm_lab']
    assert eps and eps[0].load() is main


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
    assert r.speedup_lo <= r.speedup <= r.speedup_hi
    assert targets(dict(block=t)).met.iloc[0] in ('yes', 'no')


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


@pytest.mark.parametrize('lo,met', [(2.6, 'no'), (3.1, 'yes')])
def test_gpu_step_target_needs_the_whole_interval(lo, met):
    "A mean of 3.3x whose interval dips below 3x is not a met target: the verdict must survive a rerun."
    t = pd.DataFrame([dict(variant='eager', device='cuda', speedup=1.0, speedup_lo=1.0, speedup_hi=1.0),
                      dict(variant='compile', device='cuda', speedup=3.3, speedup_lo=lo, speedup_hi=3.6)])
    row = targets(dict(step=t)).set_index('benchmark').loc['training step, best variant over eager']
    assert row.met == met and '3.30x' in row.measured
