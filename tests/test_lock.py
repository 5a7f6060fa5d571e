"""requirements.lock pins, with hashes, every dependency pyproject.toml names (and the dev extra), torch at the
CPU build of 2.13.0 and nothing of CUDA; `make lock` is the command in its header; `make setup` installs from it."""
import hashlib
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip('tomllib')
ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / 'requirements.lock'
PIN = re.compile(r'^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$')
HASH = re.compile(r'^    --hash=sha256:([0-9a-f]{64})( \\)?$')


def read_lock(text):
    "{canonical name: (version, [sha256, ...])} from pip-compile's `name==version \\` + `--hash=sha256:...` lines."
    pins, name = {}, None
    for i, line in enumerate(text.splitlines(), 1):
        if m := PIN.match(line):
            name = canonicalize_name(m[1])
            assert name not in pins, f'requirements.lock line {i}: {m[1]} pinned twice'
            pins[name] = (m[2], [])
        elif m := HASH.match(line):
            assert name is not None, f'requirements.lock line {i}: a hash before any pin'
            pins[name][1].append(m[1])
        else:
            assert not line.strip() or line.lstrip().startswith('#'), f'requirements.lock line {i}: {line!r}'
            name = None                                        # a comment ends a pin's hash lines
    return pins


def declared():
    "The requirements of pyproject.toml's [project.dependencies] and its dev extra."
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    return [Requirement(r) for r in project['dependencies'] + project['optional-dependencies']['dev']]


def test_read_lock_parses_pins_and_hashes():
    h1, h2 = '1' * 64, '2' * 64
    text = f'#\n# header\nfoo-Bar==1.0 \\\n    --hash=sha256:{h1} \\\n    --hash=sha256:{h2}\n    # via x\nbaz==2 \\\n'
    assert read_lock(text) == {'foo-bar': ('1.0', [h1, h2]), 'baz': ('2', [])}
    with pytest.raises(AssertionError, match='line 1'): read_lock('foo>=1\n')
    with pytest.raises(AssertionError, match='pinned twice'): read_lock('a==1 \\\na==2 \\\n')


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = read_lock(LOCK.read_text())
    for req in declared():
        names = [req.name, *req.extras]                         # dask[distributed]: dask and distributed
        for name in names:
            assert canonicalize_name(name) in pins, f'{name} (from {req}) is not pinned in requirements.lock'
        version = pins[canonicalize_name(req.name)][0]
        assert req.specifier.contains(Version(version), prereleases=True), f'{req.name}=={version} is not in {req}'


def test_every_pin_carries_a_hash():
    pins = read_lock(LOCK.read_text())
    assert len(pins) > len(declared())                          # the transitive dependencies are pinned too
    assert not [n for n, (_, hashes) in pins.items() if not hashes]


def test_torch_is_the_cpu_build_of_2_13_0_and_nothing_of_cuda():
    pins = read_lock(LOCK.read_text())
    version, hashes = pins['torch']
    assert Version(version).public == '2.13.0' and Version(version).local in (None, 'cpu')
    held = [Requirement(l) for l in (ROOT / 'constraints.txt').read_text().splitlines() if l and l[0] != '#']
    assert [str(r) for r in held] == ['torch==2.13.0'] and held[0].specifier.contains(Version(version))
    assert not [n for n in pins if re.search(r'nvidia|cuda|cudnn|cublas|nccl|triton', n)]
    local = sorted(Path('/opt/wheels').glob(f'torch-{version}-*.whl'))
    if local:                                                   # the lab's CPU machines: the local wheel is the one
        assert hashlib.sha256(local[0].read_bytes()).hexdigest() in hashes


def test_make_lock_is_the_command_in_the_header_and_setup_installs_the_lock():
    header = re.search(r'^#    (pip-compile .*)$', LOCK.read_text(), re.M)[1]
    makefile = (ROOT / 'Makefile').read_text().replace('\\\n', ' ')
    command = re.search(r'^PIP_COMPILE := (.*)$', makefile, re.M)[1]
    assert ' '.join(command.split()) == header
    stamp = re.search(r'^\$\(VENV\)/\.installed: (.*)$', makefile, re.M)[1].split()
    assert 'requirements.lock' in stamp and 'pyproject.toml' in stamp
    assert '--require-hashes -r requirements.lock' in makefile and '--no-deps' in makefile
