"""Finding PX (09_prefix_vs_cross_attention): the captioning mechanism (vlm_lab.captioning) holds what it must at any
scale, the caption-LM asset loads deterministically, bad parameters are refused before anything is written, and the
smallest papermill run ends in a verdict row for every PX claim."""
import copy, json, math

import pytest
import torch

from test_notebooks import NOISY, ROOT, assert_refused, check_table, run_nb, written
from vlm_lab.backbones import assets_dir
from vlm_lab.captions import ShapesCaptions
from vlm_lab.captioning import (
    LM_ASSET, CaptionParams, Captioner, CaptionerConfig, add_lora, build_captioner, caption_metrics, caption_tokenizer,
    decode_captions, encode_captions, fusion_param_count, load_caption_lm, matched_config, scene_scores, text_nll,
    trainable_patterns, train_captioner)

NB = '09_prefix_vs_cross_attention.ipynb'


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "Tiny models: one thread (on a shared machine, two threads spend their time waiting on each other)."
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


@pytest.fixture(scope='module')
def lm_tok():
    return load_caption_lm()


@pytest.fixture(scope='module')
def batch(lm_tok):
    _, tok = lm_tok
    recs = ShapesCaptions(n=4, seed=7).records
    ids, mask = encode_captions(tok, [r['captions'][0] for r in recs])
    torch.manual_seed(0)
    return dict(vision=torch.randn(4, 16, 128), input_ids=ids, attention_mask=mask), recs


def test_lm_asset_is_small_loads_deterministically_and_knows_the_captions(lm_tok, batch):
    lm, tok = lm_tok
    folder = assets_dir() / LM_ASSET
    assert sum(f.stat().st_size for f in folder.iterdir()) < 5e6
    assert json.loads((folder / 'pretraining.json').read_text())['params']['loop'] == 'vlm_lab.train.fit'
    lm2, tok2 = load_caption_lm()
    assert tok2.get_vocab() == caption_tokenizer().get_vocab()
    b, _ = batch
    with torch.no_grad():
        assert torch.equal(lm(input_ids=b['input_ids']).logits, lm2(input_ids=b['input_ids']).logits)
    s, n = text_nll(lm, b['input_ids'], b['attention_mask'])
    assert n == int(b['attention_mask'][:, 1:].sum())
    assert math.exp(s / n) < len(tok) / 4          # far below a uniform guess over the vocabulary: it knows it


def test_tokenizer_round_trip(lm_tok, batch):
    _, tok = lm_tok
    b, recs = batch
    assert decode_captions(tok, b['input_ids'][:, 1:]) == [r['captions'][0] for r in recs]
    assert tok.unk_token_id not in b['input_ids'].flatten().tolist()


def test_prefix_length_cross_identity_and_exact_counts(lm_tok, batch):
    lm, _ = lm_tok
    b, _ = batch
    d, L = lm.config.hidden_size, lm.config.num_hidden_layers
    cross = CaptionerConfig(fusion='cross', image_tokens=16)
    prefix, diff = matched_config(cross, d, L)
    mp, mc = Captioner(copy.deepcopy(lm), prefix), Captioner(copy.deepcopy(lm), cross)
    added = lambda m: sum(p.numel() for n, p in m.named_parameters() if not n.startswith('lm.'))
    assert added(mp) == fusion_param_count(prefix, d, L) and added(mc) == fusion_param_count(cross, d, L)
    assert added(mp) - added(mc) == diff and abs(diff) < 128 + 1 + d        # within one adapter unit
    inp = mp.inputs(b['vision'], b['input_ids'], b['attention_mask'])
    assert inp['inputs_embeds'].shape[1] == 16 + b['input_ids'].shape[1]   # prefix: image tokens + text
    with torch.no_grad():
        ref = lm(input_ids=b['input_ids'], attention_mask=b['attention_mask']).logits
        got = mc.lm(**mc.inputs(b['vision'], b['input_ids'], b['attention_mask'])).logits
        assert torch.allclose(got, ref, atol=1e-6)                          # gates at 0: the LM alone
        mc._media = None
        mc.xattn[0].gate.fill_(1.0)
        moved = mc.lm(**mc.inputs(b['vision'], b['input_ids'], b['attention_mask'])).logits
        assert not torch.allclose(moved, ref, atol=1e-4)                    # an open gate lets the image in
    mc._media = None


def test_trainable_sets_and_lora(lm_tok, batch):
    lm, _ = lm_tok
    b, _ = batch
    cfg = CaptionerConfig(fusion='cross', image_tokens=16)
    L = lm.config.num_hidden_layers
    last2 = sum(p.numel() for n, p in lm.named_parameters() if n.startswith((f'model.layers.{L - 2}.',
                                                                             f'model.layers.{L - 1}.')))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    fo, _ = build_captioner(copy.deepcopy(lm), cfg, trainable='fusion_only')
    st, _ = build_captioner(copy.deepcopy(lm), cfg, trainable='strategic')
    al, _ = build_captioner(copy.deepcopy(lm), cfg, trainable='all')
    lo, _ = build_captioner(copy.deepcopy(lm), cfg, trainable='lora', lora_r=4)
    d = lm.config.hidden_size
    assert count(fo) == fusion_param_count(cfg, d, L)
    assert count(st) == count(fo) + last2
    assert count(al) == sum(p.numel() for p in al.parameters())
    lora = sum(p.numel() for n, p in lo.named_parameters() if 'lora_' in n)
    assert count(lo) == count(fo) + lora and lora > 0
    with torch.no_grad():                                                   # LoRA's B starts at 0
        assert torch.allclose(lo.lm(input_ids=b['input_ids']).logits, lm(input_ids=b['input_ids']).logits, atol=1e-6)
    with pytest.raises(ValueError, match="trainable='lora' needs add_lora"):
        trainable_patterns(Captioner(copy.deepcopy(lm), cfg), 'lora')


@pytest.mark.parametrize('fusion', ['prefix', 'cross'])
def test_training_step_and_generate(lm_tok, batch, fusion):
    lm, tok = lm_tok
    b, recs = batch
    cfg = CaptionerConfig(fusion=fusion, image_tokens=16)
    m, _ = build_captioner(copy.deepcopy(lm), cfg)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    log = train_captioner(m, b, epochs=2, batch_size=4, amp=True, clip=1.0, seed=0)
    assert log['steps'] == 2 and log['nonfinite'] == 0
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters() if p.requires_grad)
    g1 = m.generate(b['vision'], tok, decoding='greedy', max_new_tokens=12)
    assert len(g1) == 4 and g1 == m.generate(b['vision'], tok, decoding='greedy', max_new_tokens=12)
    k1 = m.generate(b['vision'], tok, decoding='top_k', top_k=50, seed=3, max_new_tokens=12)
    assert k1 == m.generate(b['vision'], tok, decoding='top_k', top_k=50, seed=3, max_new_tokens=12)
    assert m._media is None and not m._prefix_gen                          # nothing left behind for the next call
    assert set(caption_metrics(g1, recs)) >= {'f1', 'exact', 'distinct_2', 'self_bleu'}


def test_scene_scores():
    r = ShapesCaptions(n=3, seed=3).records[2]
    for cap in r['captions'][::2]:                                          # both wordings with places
        assert scene_scores(cap, r['objects'])['f1'] == 1.0
    o = r['objects'][0]
    wrong = f"a {o['color']} {o['shape']} at the {'center' if (o['row'], o['col']) != (1, 1) else 'top'} ."
    s = scene_scores(wrong, r['objects'])
    assert s['colour_p'] == 1.0 and s['position_p'] == 0.0


def test_unknown_parameter_is_named():
    from vlm_lab.experiments import check_params
    with pytest.raises(ValueError, match='unknown parameter'):
        check_params(ROOT / 'nbs' / NB, {'bogus': 1})
    assert check_params(ROOT / 'nbs' / NB, {'fusion': 'cross'})['fusion'] == 'cross'
    assert CaptionParams.resolve({'profile': 'full'}).amp is True


@pytest.mark.parametrize('params,message', [
    ((('fusion', 'gated'),), "parameter fusion='gated' is invalid"),
    ((('image_tokens', 32),), 'parameter image_tokens=32 is invalid'),
    ((('trainable', 'last3'),), "parameter trainable='last3' is invalid"),
])
def test_prefix_vs_cross_bad_parameters_write_nothing(tmp_path, params, message):
    assert_refused(NB, tmp_path, params, message)


def test_prefix_vs_cross_small_run(tmp_path):
    "The smallest run: every PX claim gets a row, nothing noisy decides from 2 seeds, the figures are written."
    r = run_nb(NB, tmp_path / 'out.ipynb', tmp_path, ('fusion', 'cross'), ('seeds', 2), ('epochs', 1),
               ('n_train', 16), ('n_val', 8), ('timing_repeats', 2))
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(next((tmp_path / 'results' / '09_prefix_vs_cross_attention').glob('*.json')).read_text())
    assert rec['params']['fusion'] == 'cross' and rec['params']['seeds'] == [0, 1]
    check_table(rec['verdicts'], 'PX')
    assert all(r['verdict'] in ('inconclusive', 'not tested') for r in rec['verdicts'] if r['kind'] in NOISY)
    conds = set(rec['metrics']['runs']['condition'])
    assert {'prefix', 'cross', 'cross: amp on', 'cross: fixed steps', 'prefix: fusion_only', 'cross: lora'} <= conds
    m = rec['metrics']
    assert m['matched']['image_tokens'] == 16 and abs(m['matched']['added_param_difference']) < 200
    files = written(tmp_path)
    for fig in ('px_quality_vs_cost', 'px_ablation', 'px_interaction', 'px_cost_vs_tokens', 'px_samples'):
        assert any(f.startswith(f'results/figures/{fig}') for f in files), fig
