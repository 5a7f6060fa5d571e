"""Every Python code block of README.md runs as written, in order, in a fresh folder."""
import re
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
README = Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, lab_root, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    ns = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f'README.md python block {i}', 'exec'), ns)
    assert 'drop_abs' in capsys.readouterr().out                  # the diagnostics printed their tables
    assert ns['cap'].grads and all(g[0].abs().sum() > 0 for g in ns['cap'].grads.values())   # gradients captured
    vd = ns['vision_dependency'](ns['model'], ns['test_dl'], modes='shuffle')
    assert vd[vd.qtype == 'all'].drop_abs.item() > 0                # the recipe's model uses the image
