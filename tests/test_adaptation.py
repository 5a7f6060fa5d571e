"""Finding LU (08_lora_vs_unfreeze, vlm_lab.adaptation): exact parameter counts against peft's own, the trainable
sets of each method, gradient coverage, forgetting, the parameters' validation, and one small papermill run."""
import json

import pytest
import torch
from transformers import (BartConfig, BartModel, BertConfig, BertForSequenceClassification, BertModel, Dinov2Config,
                          Dinov2Model)

from test_notebooks import NOISY, assert_refused, check_table, run_nb, written
from vlm_lab import adaptation as ad
from vlm_lab.backbones import text_path, tiny_text, tiny_vision, vision_path
from vlm_lab.train import fit

NB = '08_lora_vs_unfreeze.ipynb'
bert_base = lambda: BertModel(BertConfig())
minilm = lambda: BertModel(BertConfig.from_pretrained(str(text_path())), add_pooling_layer=False)


def test_unfreeze_counts_are_whole_layers():
    m = ad.on_meta(bert_base)
    layer = ad.bert_layer_params(768, 3072)
    assert sum(p.numel() for p in m.encoder.layer[0].parameters()) == layer
    for n in (1, 3, 12):
        assert ad.unfreeze_count(m, n) == n * layer
    pooler = sum(p.numel() for p in m.pooler.parameters())
    assert ad.unfreeze_count(m, 3, extra=['pooler']) == 3 * layer + pooler == 3 * layer + 768 * 768 + 768
    mini = ad.on_meta(minilm)
    c = mini.config
    assert ad.unfreeze_count(mini, 3) == 3 * ad.bert_layer_params(c.hidden_size, c.intermediate_size)


@pytest.mark.parametrize('make,scope,blocks', [(bert_base, 'layers', 12), (minilm, 'layers', 6),
                                               (lambda: BartModel(BartConfig(d_model=768, encoder_layers=6,
                                                                             decoder_layers=6)), 'model', 18)])
@pytest.mark.parametrize('r', [4, 16])
def test_lora_qkv_count_is_peft_count(make, scope, blocks, r):
    "peft's own count = closed form r x (in + out) = blocks x 3 matrices x r x 2d (BART: encoder + decoder + cross)."
    m = ad.on_meta(make)
    d = m.config.hidden_size if hasattr(m.config, 'hidden_size') else m.config.d_model
    names = ad.lora_targets(m, 'qkv', scope=scope)
    assert len(names) == 3 * blocks
    trainable, total = ad.peft_count(make, names, r)
    assert trainable == ad.lora_count(m, names, r) == blocks * 3 * r * 2 * d
    assert total == sum(p.numel() for p in m.parameters()) + trainable


def test_lora_count_is_linear_in_r_for_every_target():
    m = ad.on_meta(minilm)
    for target in ad.TARGETS:
        names = ad.lora_targets(m, target)
        one = ad.peft_count(minilm, names, 1)[0]
        assert [ad.peft_count(minilm, names, r)[0] for r in (4, 8, 32)] == [4 * one, 8 * one, 32 * one]


def test_vision_lora_on_dinov2_and_the_shapes_vit():
    dinov2_base = lambda: Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12))
    m = ad.on_meta(dinov2_base)
    names = ad.lora_targets(m, 'qkv')
    assert len(names) == 36 and ad.peft_count(dinov2_base, names, 8)[0] == 12 * 3 * 8 * 2 * 768
    svit = lambda: Dinov2Model(Dinov2Config.from_pretrained(str(vision_path())))
    s = ad.on_meta(svit)
    assert ad.peft_count(svit, ad.lora_targets(s, 'qkv'), 8)[0] == ad.lora_count(s, ad.lora_targets(s, 'qkv'), 8)


def test_sequence_classification_adds_the_head_to_modules_to_save():
    cls = lambda: BertForSequenceClassification(BertConfig(num_labels=3))
    m = ad.on_meta(cls)
    names = ad.lora_targets(m, 'qkv')
    plain = ad.peft_count(cls, names, 16)[0]
    with_task = ad.peft_count(cls, names, 16, task_type='SEQ_CLS')[0]
    assert plain == ad.lora_count(m, names, 16) and with_task == plain + 768 * 3 + 3


@pytest.fixture(scope='module')
def tiny():
    text, _ = tiny_text(seed=0, hidden_size=32, num_layers=3)
    return text, tiny_vision(seed=0)


def _batch(text, vision, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 64, 64, generator=g)
    with torch.no_grad(): feats = vision(images)
    return dict(vision=feats, image=images, input_ids=torch.randint(1000, 2000, (n, 7), generator=g),
                attention_mask=torch.ones(n, 7, dtype=torch.long), answer=torch.randint(0, 22, (n,), generator=g))


@pytest.mark.parametrize('cond', [dict(method='frozen'), dict(method='unfreeze', unfreeze_layers=2),
                                  dict(method='lora', r=4), dict(method='lora', r=4, target='all'),
                                  dict(method='lora_both', r=4)])
def test_build_model_trains_exactly_its_set_and_lora_starts_as_identity(tiny, cond):
    text, vision = tiny
    model = ad.build_model(cond, text, vision, seed=0, d_model=16)
    t = ad.on_meta(lambda: BertModel(text.config))
    want = {'frozen': 0, 'unfreeze': ad.unfreeze_count(t, 2)}.get(cond['method'])
    if want is None: want = ad.lora_count(t, ad.lora_targets(t, cond.get('target', 'qkv')), 4)
    assert ad.trainable_count(model, 'text.') == want
    assert ad.trainable_count(model, 'vision.') == (ad.lora_count(vision.backbone, ad.lora_targets(vision.backbone), 8)
                                                    if cond['method'] == 'lora_both' else 0)
    assert ad.trainable_count(model, 'head.') == sum(p.numel() for p in model.head.parameters())
    assert not any('lora_' in n for n, _ in text.named_parameters())              # the original is copied, not adapted
    b = _batch(text, vision)
    ref = ad.build_model(dict(method='frozen'), text, vision, seed=0, d_model=16).eval()
    inp = {k: v for k, v in b.items() if k != ('vision' if cond['method'] == 'lora_both' else 'image')}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(inp)['logits'], ref({k: v for k, v in b.items() if k != 'image'})['logits'],
                                   atol=1e-5, rtol=1e-5)


def test_grad_coverage_zero_below_the_unfrozen_layers_everywhere_with_lora(tiny):
    text, vision = tiny
    b = {k: v for k, v in _batch(text, vision).items() if k != 'image'}
    unf = ad.grad_coverage(ad.build_model(dict(method='unfreeze', unfreeze_layers=1), text, vision).train(), b)
    assert unf.grad_norm.tolist()[:2] == [0.0, 0.0] and unf.grad_norm.iloc[2] > 0
    assert unf.trainable.tolist() == [0, 0, ad.unfreeze_count(text, 1)]
    lora = ad.grad_coverage(ad.build_model(dict(method='lora', r=2), text, vision).train(), b)
    assert (lora.grad_norm > 0).all() and (lora.trainable > 0).all()


def test_swap_task_and_forgetting():
    ds = ad.swap_vqa(40, seed=1)
    assert all(r['answer'] == r['objects'][0][r['slots']['asked']] for r in ds.records)
    assert sum(r['slots']['asked'] == 'shape' for r in ds.records) == 20
    assert [r['question'] for r in ds.records] == [r['question'] for r in ad.swap_vqa(40, seed=1).records]
    e = torch.nn.functional.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    f = ad.forgetting(e, e)
    assert abs(f['drift']) < 1e-6 and abs(f['rank_loss']) < 1e-6
    moved = ad.forgetting(torch.nn.functional.normalize(e + 0.5 * torch.randn(10, 8), dim=-1), e)
    assert moved['drift'] > 0 and moved['rank_loss'] > 0
    assert ad.token_f1('top left', 'left') == pytest.approx(2 / 3) and ad.token_f1('red', 'red') == 1.0


def test_same_seed_same_training(tiny):
    text, vision = tiny
    pool = {k: v for k, v in _batch(text, vision, n=24, seed=3).items()}
    def once():
        m = ad.build_model(dict(method='lora', r=2), text, vision, seed=5, d_model=16)
        res = fit(m, ad.TaskLoader(pool, range(16), 4, shuffle=True, seed=5), ad.TaskLoader(pool, range(16, 24), 8),
                  epochs=2, lr=3e-3, lr_groups={'text.*': 1e-3}, metric='loss', seed=5)
        return res.history[['train_loss', 'val_loss']].to_numpy()
    assert (once() == once()).all()


@pytest.mark.parametrize('given,message', [
    (dict(method='adapter'), "parameter method='adapter' is invalid"),
    (dict(r=0), 'parameter r=0 is invalid'),
    (dict(target='mlp'), "parameter target='mlp' is invalid"),
    (dict(unfreeze_layers=7), 'parameter unfreeze_layers=7 is invalid'),
    (dict(sweep='1e-3,fast'), "parameter sweep='1e-3,fast' is invalid"),
    (dict(sweep='0,1e-3'), 'expected rates in (0, 1]'),
    (dict(lora_sweep='1e-3,2'), "parameter lora_sweep='1e-3,2' is invalid"),
    (dict(method='frozen', r=8), "configure an adapted encoder: method='frozen'"),
    (dict(seeds=0), 'parameter seeds=0 is invalid'),
    (dict(bogus=1), "unknown parameter(s) ['bogus']"),
])
def test_bad_parameters_are_named(given, message):
    with pytest.raises(ValueError) as e: ad.LoRAParams.resolve(given)
    assert message in str(e.value)


def test_params_defaults_and_one_rate_sweep():
    p = ad.LoRAParams.resolve(dict(sweep=1e-3))
    assert p.sweep == ['0.001'] and p.rates('unfreeze') == p.rates('lora') == [1e-3] and p.alpha == 32
    assert p.seeds == list(range(5))
    q = ad.LoRAParams.resolve({})                                # each family sweeps its own rates, LoRA's higher
    assert q.sweep is None and q.rates('unfreeze') == [6e-5, 2e-4, 6e-4] and q.rates('lora') == [6e-4, 2e-3, 6e-3]
    assert ad.LoRAParams.resolve(dict(lora_sweep=3e-3)).rates('lora') == [3e-3]
    assert ad.condition_name(p.focus()) == 'lora r16'
    assert ad.condition_name(ad.LoRAParams.resolve(dict(method='unfreeze', unfreeze_layers=2)).focus()) == 'unfreeze-2'


@pytest.mark.parametrize('params,message', [
    ((('method', 'adapter'),), "parameter method='adapter' is invalid"),
    ((('target', 'mlp'),), "parameter target='mlp' is invalid"),
    ((('method', 'frozen'), ('r', 8)), "configure an adapted encoder"),
])
def test_bad_parameters_write_nothing(tmp_path, params, message):
    assert_refused(NB, tmp_path, params, message)


def test_small_run(tmp_path):
    "The smallest run: every LU claim gets a row, the exact rows hold at any scale, nothing noisy is decided."
    r = run_nb(NB, tmp_path / 'out.ipynb', tmp_path, ('method', 'unfreeze'), ('unfreeze_layers', 2), ('seeds', 2),
               ('epochs', 1), ('n_samples', 32), ('test_size', 20), ('sweep', '1e-3'), ('matched', True))
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(next((tmp_path / 'results' / '08_lora_vs_unfreeze').glob('*.json')).read_text())
    assert rec['params']['method'] == 'unfreeze' and rec['params']['seeds'] == [0, 1]
    check_table(rec['verdicts'], 'LU')
    rows = {r['claim']: r for r in rec['verdicts']}
    assert all(r['verdict'] in ('inconclusive', 'not tested') for r in rec['verdicts'] if r['kind'] in NOISY)
    assert rows['LU-4']['verdict'] == 'mechanism' and 'unfreeze-2: 4 of 6 layers' in rows['LU-4']['measured']
    assert rows['LU-2']['verdict'] == 'mechanism' and rows['LU-1 unfreeze-3']['verdict'] == 'refuted'
    assert rows['LU-3 [matched parameters]']['verdict'] == 'inconclusive'          # run (-p matched True), 2 seeds
    runs = rec['metrics']['runs']
    assert set(runs['condition']) == {'frozen', 'unfreeze-2', 'lora r8', 'lora r16', 'lora r32', 'lora_both r16',
                                      'unfreeze-1', 'matched: lora r43 all'}
    text, m = dict(zip(runs['condition'], runs['text_trainable'])), ad.on_meta(minilm)
    per_rank = ad.lora_count(m, ad.lora_targets(m, 'all'), 1)                       # the matched rank: nearest count
    assert text['unfreeze-1'] == ad.unfreeze_count(m, 1)
    assert abs(text['matched: lora r43 all'] - text['unfreeze-1']) <= per_rank // 2
    files = written(tmp_path)
    for fig in ('lu_pareto', 'lu_learning_curves', 'lu_grad_coverage', 'lu_learned_vs_forgotten'):
        assert any(f.startswith(f'results/figures/{fig}') for f in files), fig


@pytest.mark.parametrize('cond,depth', [(dict(method='frozen'), 3), (dict(method='unfreeze', unfreeze_layers=1), 2),
                                        (dict(method='unfreeze', unfreeze_layers=3), 0), (dict(method='lora', r=2), 0)])
def test_cached_frozen_bottom_is_the_full_forward(tiny, cond, depth):
    "With the frozen bottom's hidden states from the pool, logits and gradients are the full pass's (padding too)."
    text, vision = tiny
    b = {k: v for k, v in _batch(text, vision, n=8, seed=4).items() if k != 'image'}
    b['attention_mask'][:4, 4:] = 0                                                  # padded questions
    model = ad.build_model(cond, text, vision, seed=1, d_model=16)
    assert model.frozen_depth() == depth
    model.train()
    assert [l.training for l in model.text.encoder.layer] == [i >= depth for i in range(3)]
    if depth == 0: return
    cached = dict(b, **ad.frozen_hidden(text, b['input_ids'], b['attention_mask'], [depth]))
    model.eval()
    outs = []
    for batch in (b, cached):
        model.zero_grad()
        out = model(batch)
        out['loss'].backward()
        outs.append([out['logits'].detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for x, y in zip(*outs): torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    loader = ad.TaskLoader(cached, range(8), 4, hidden=depth)
    assert ad.hidden_key(depth) in next(iter(loader))
    with pytest.raises(KeyError, match=r'pass task_pool layers=\[1\]'): ad.TaskLoader(cached, range(8), hidden=1)
