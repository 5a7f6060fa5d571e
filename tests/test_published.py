"""The committed notebooks as a reader finds them (written by `vlm_lab reproduce --publish`): every notebook carries
its outputs without machine noise, each finding's verdict table and generated summary agree with the committed
ledger (figures/findings.csv), and README's table of findings is the one the ledger generates."""
import json, re, subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from vlm_lab import experiments as ex

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / 'nbs').glob('*.ipynb'))
ABSOLUTE = re.compile(r'(?<![\w.~])/(?:home|root|tmp|work|check|Users|private|var/folders)/')
TABLE_HEAD = ['claim', 'note', 'measured', 'n', 'verdict', 'why', 'noise', 'figure']


def outputs(nb: Path) -> list[dict]:
    return [o for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code' for o in c['outputs']]


def texts(o: dict) -> list[str]:
    parts = [o.get('text', '')] + [v for k, v in o.get('data', {}).items() if k.startswith('text/')]
    return [''.join(p) if isinstance(p, list) else p for p in parts]


class _Rows(HTMLParser):
    "The rows of an HTML table as lists of cell texts (header row included)."
    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None
    def handle_starttag(self, tag, attrs):
        if tag == 'tr': self.rows.append([])
        elif tag in ('td', 'th'): self._cell = ''
    def handle_endtag(self, tag):
        if tag in ('td', 'th') and self._cell is not None: self.rows[-1].append(self._cell.strip()); self._cell = None
    def handle_data(self, data):
        if self._cell is not None: self._cell += data


def verdict_table(nb: Path) -> pd.DataFrame:
    "The finding's verdict table as the committed notebook shows it (the HTML output of its VerdictTable)."
    for o in outputs(nb):
        html = ''.join(o.get('data', {}).get('text/html', ''))
        if not html: continue
        p = _Rows()
        p.feed(html)
        rows = [r for r in p.rows if r]
        if rows and rows[0] == TABLE_HEAD: return pd.DataFrame(rows[1:], columns=TABLE_HEAD)
    raise AssertionError(f"{nb.name} shows no verdict table")


def ledger() -> pd.DataFrame:
    return pd.read_csv(ROOT / 'figures' / 'findings.csv', dtype=str, keep_default_na=False)


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_carries_its_outputs_without_machine_noise(nb):
    outs = outputs(nb)
    assert outs, f"{nb.name} carries no outputs: publish it (vlm_lab reproduce --publish)"
    assert not [o for o in outs if o.get('name') == 'stderr'], 'progress bars or warnings on stderr'
    assert not [o for o in outs if 'application/vnd.jupyter.widget-view+json' in o.get('data', {})]
    noisy = [t for o in outs for t in texts(o) if ABSOLUTE.search(t)]
    assert not noisy, f"absolute paths in {nb.name}: {ABSOLUTE.search(noisy[0]).group()}..."
    assert 'papermill' not in json.loads(nb.read_text())['metadata']


@pytest.mark.parametrize('name', list(ex.FINDINGS))
def test_finding_notebook_agrees_with_the_ledger(name):
    nb = ROOT / 'nbs' / f"{name}.ipynb"
    entry, rows = ex.FINDINGS[name], ledger()
    rows = rows[(rows.finding == entry['finding']) & (rows.result != '')].set_index('claim')    # the run's rows
    shown = verdict_table(nb).set_index('claim')
    assert len(rows) and sorted(shown.index) == sorted(rows.index)
    for col in ('verdict', 'measured', 'note', 'n'):
        assert (shown[col] == rows.loc[shown.index, col]).all(), shown[col].compare(rows.loc[shown.index, col])
    cells = json.loads(nb.read_text())['cells']
    assert cells[1]['id'] == ex.SUMMARY_ID, 'the notebook opens with its generated summary'
    summary = ''.join(cells[1]['source'])
    for claim, r in rows.iterrows():
        assert f"| {claim} | {r.note.replace('|', chr(92) + '|')} | " in summary and f"| {r.verdict} |" in summary
    figure = re.search(r'!\[[^]]*\]\(([^)]+)\)', summary)
    assert figure and (nb.parent / figure.group(1)).is_file(), 'the headline figure is committed'


def test_readme_table_is_the_ledgers():
    table = ledger().astype({'n': object})
    text = (ROOT / 'README.md').read_text()
    start, end = ex.README_MARKERS
    assert start in text and end in text
    block = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert block == ex.headline_markdown(table).strip()


def test_ledger_links_resolve_in_a_clone():
    "Every figure and result the ledger links exists and is not git-ignored, so a fresh clone has it too."
    links = [(ROOT / 'figures' / l).resolve() for col in ('figure', 'result') for l in ledger()[col].dropna() if l]
    assert links and all(p.is_file() for p in links), [p for p in links if not p.is_file()]
    ignored = subprocess.run(['git', 'check-ignore', *map(str, links)], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout == '', ignored.stdout
