from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lab.data import (ANSWERS, QTYPES, ShapesVQA, VQACollator, VQADataset, answer_prior, answer_question,
                          prior_answer)
from vlm_lab.backbones import load_tokenizer

HEADER = 'image_path,question,answer,qtype\n'


@pytest.fixture(scope='module')
def small():
    return ShapesVQA(n=24, seed=3)


@pytest.fixture
def folder(tmp_path, small):
    small.subset(range(4)).to_csv(tmp_path / 'ok')
    return tmp_path


def write(folder, name, text):
    p = folder / name; p.write_text(text); return p


def test_generation_is_deterministic_and_seeded():
    a, b, c = ShapesVQA(n=80, seed=1), ShapesVQA(n=80, seed=1), ShapesVQA(n=80, seed=2)
    assert a.records == b.records and a.fingerprint() == b.fingerprint()
    assert a.records != c.records and a.fingerprint() != c.fingerprint()
    assert torch.equal(a[5]['image'], b[5]['image'])


def test_answers_are_correct_and_balanced():
    ds = ShapesVQA(n=400, seed=0)
    assert all(answer_question(r['objects'], r['template'], r['slots']) == r['answer'] for r in ds.records)
    assert Counter(r['qtype'] for r in ds.records) == {t: 100 for t in QTYPES}
    for t in QTYPES:
        c = Counter(r['answer'] for r in ds.records if r['qtype'] == t)
        assert max(c.values()) - min(c.values()) <= 1


def _prior(sp):
    "answer_prior of a split dict: fit on train, evaluated on test, per question text."
    col = lambda split, key: [r[key] for r in sp[split].records]
    return answer_prior(col('train', 'answer'), col('train', 'qtype'), col('train', 'question'),
                        eval_answers=col('test', 'answer'), eval_qtypes=col('test', 'qtype'),
                        eval_questions=col('test', 'question')).set_index('qtype')


def test_bias_knob():
    full = ShapesVQA(n=400, bias=1.0, seed=0)
    assert all(r['answer'] == prior_answer(r['question'], r['qtype']) for r in full.records)
    assert _prior(full.splits()).loc['all', 'prior_acc'] == 1.0
    none = ShapesVQA(n=2000, bias=0.0, seed=0)
    assert _prior(none.splits()).loc['all', 'prior_acc'] < 0.5   # far below the bias=1 rule; near chance (about 0.2)
    by_type = answer_prior([r['answer'] for r in none.records], [r['qtype'] for r in none.records]).set_index('qtype')
    assert by_type.drop(index='all').bias.abs().max() < 0.05      # balanced per type at bias 0


def test_answer_prior_held_out_and_errors():
    # question text fixes the answer; a held-out set with an unseen question falls back to the type's majority
    ap = answer_prior(['x', 'y', 'x', 'x'], ['C'] * 4, questions=['q1', 'q2', 'q1', 'q1'], eval_answers=['x', 'y', 'x'],
                      eval_qtypes=['C'] * 3, eval_questions=['q1', 'q2', 'q3']).set_index('qtype')
    assert ap.loc['C', 'prior_acc'] == 1.0 and ap.loc['C', 'chance'] == 0.5
    with pytest.raises(ValueError, match='eval_questions'):
        answer_prior([1], [0], questions=['q'], eval_answers=[1], eval_qtypes=[0])
    with pytest.raises(ValueError, match='eval_answers'):
        answer_prior([1], [0], eval_answers=[1, 2], eval_qtypes=[0])


@pytest.mark.parametrize('kw,msg', [(dict(n=0), 'n=0'), (dict(bias=-0.1), 'bias=-0.1'), (dict(bias='high'), 'bias'),
                                    (dict(seed=-1), 'seed'), (dict(max_objects=3), 'max_objects')])
def test_bad_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg): ShapesVQA(**kw)


def test_splits(small):
    sp = small.splits(seed=0)
    idx = [r['question'] for k in ('train', 'val', 'test') for r in sp[k].records]
    assert sorted(idx) == sorted(r['question'] for r in small.records)
    assert [len(sp[k]) for k in ('train', 'val', 'test')] == [19, 2, 3]
    with pytest.raises(ValueError, match='fracs'): small.splits(fracs=(0.5, 0.6, 0.1))


def test_item_format(small):
    it = small[0]
    assert it['image'].shape == (3, 64, 64) and it['image'].dtype == torch.float32
    assert 0 <= it['image'].min() and it['image'].max() <= 1
    assert small.answers[it['answer_id']] == it['answer'] and QTYPES[it['qtype_id']] == it['qtype']


def test_csv_round_trip(tmp_path, small):
    csv = small.to_csv(tmp_path / 'ds')
    back = VQADataset.from_csv(csv)
    assert [r['answer'] for r in back.records] == [r['answer'] for r in small.records]
    assert all(torch.equal(back[i]['image'], small[i]['image']) for i in range(len(small)))
    assert back.fingerprint() == VQADataset.from_csv(csv).fingerprint()
    with pytest.raises(FileExistsError): small.to_csv(tmp_path / 'ds')
    small.subset(range(2)).to_csv(tmp_path / 'ds', overwrite=True)
    assert len(VQADataset.from_csv(tmp_path / 'ds' / 'data.csv')) == 2


def test_csv_export_folder_gets_the_umask_mode(tmp_path, small):
    from vlm_lab.core import current_umask
    small.to_csv(tmp_path / 'ds')
    assert ((tmp_path / 'ds').stat().st_mode & 0o777) == 0o777 & ~current_umask()


@pytest.mark.parametrize('where', ['../other.png', 'ABS'])
def test_csv_image_path_outside_the_folder_is_refused(folder, where):
    where = str((folder / 'ok' / 'images' / '000000.png').resolve()) if where == 'ABS' else where
    p = write(folder / 'ok', 'a.csv', HEADER + f'{where},How many objects are there?,1,COUNT\n')
    with pytest.raises(ValueError, match=r'row 1 \(line 2\).*points outside the image folder'):
        VQADataset.from_csv(p, folder / 'ok')


def test_csv_missing_column(folder):
    p = write(folder, 'a.csv', 'image_path,question,answer\nimages/000000.png,q,1\n')
    with pytest.raises(ValueError, match=r"a\.csv is missing column\(s\) \['qtype'\]"):
        VQADataset.from_csv(p, folder / 'ok')


def test_csv_missing_image(folder):
    p = write(folder, 'a.csv', HEADER + 'images/000000.png,How many objects are there?,1,COUNT\n'
                                         'images/gone.png,How many objects are there?,2,COUNT\n')
    with pytest.raises(FileNotFoundError, match=r'row 2 \(line 3\).*gone\.png does not exist'):
        VQADataset.from_csv(p, folder / 'ok')


def test_csv_unreadable_image(folder):
    (folder / 'ok' / 'images' / 'junk.png').write_bytes(b'\x89PNG garbage')
    p = write(folder, 'a.csv', HEADER + 'images/junk.png,How many objects are there?,1,COUNT\n')
    with pytest.raises(ValueError, match=r'row 1 .*junk\.png is not a readable image'):
        VQADataset.from_csv(p, folder / 'ok')


def test_csv_empty(folder):
    with pytest.raises(ValueError, match='is empty'): VQADataset.from_csv(write(folder, 'e.csv', ''), folder / 'ok')
    with pytest.raises(ValueError, match='no rows'): VQADataset.from_csv(write(folder, 'h.csv', HEADER), folder / 'ok')
    with pytest.raises(FileNotFoundError, match='does not exist'): VQADataset.from_csv(folder / 'none.csv')


def test_csv_unknown_qtype_and_answer(folder):
    p = write(folder, 'a.csv', HEADER + 'images/000000.png,Is it big?,yes,SIZE\n')
    with pytest.raises(ValueError, match=r"row 1 .*unknown question type 'SIZE'"):
        VQADataset.from_csv(p, folder / 'ok')
    p = write(folder, 'b.csv', HEADER + 'images/000000.png,What color is it?,purple,COLOR\n')
    with pytest.raises(ValueError, match=r"row 1 .*unknown answer 'purple'"):
        VQADataset.from_csv(p, folder / 'ok', answers=ANSWERS)
    # without a fixed vocabulary a user's own answers define it
    assert VQADataset.from_csv(p, folder / 'ok').answers == ['purple']


def test_csv_empty_cell(folder):
    p = write(folder, 'a.csv', HEADER + 'images/000000.png,,1,COUNT\n')
    with pytest.raises(ValueError, match=r"row 1 .*empty value in column 'question'"):
        VQADataset.from_csv(p, folder / 'ok')


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'I;16'])
def test_csv_converts_modes_to_rgb(folder, mode):
    arr = (np.random.default_rng(0).random((40, 30)) * 255).astype(np.uint8)
    im = Image.fromarray(arr).convert(mode) if mode != 'I;16' else Image.fromarray(arr.astype(np.uint16) * 200)
    im.save(folder / 'ok' / 'images' / 'm.png')
    p = write(folder, 'a.csv', HEADER + 'images/m.png,How many objects are there?,1,COUNT\n')
    x = VQADataset.from_csv(p, folder / 'ok', image_size=32)[0]['image']
    assert x.shape == (3, 32, 32)


def test_collator(small):
    b = VQACollator(load_tokenizer(), max_length=16)([small[i] for i in range(5)])
    assert b['image'].shape == (5, 3, 64, 64) and b['input_ids'].shape[0] == 5
    assert b['input_ids'].shape == b['attention_mask'].shape and b['input_ids'].shape[1] <= 16
    assert b['answer'].tolist() == [small[i]['answer_id'] for i in range(5)]
    with pytest.raises(TypeError, match='tokenizer'): VQACollator(None)

