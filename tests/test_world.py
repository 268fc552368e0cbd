import numpy as np
import pandas as pd
import pytest

from common import world as W


def test_log_uniform_exposures_cover_the_range():
    x = W.log_uniform_exposures(20000, 127, np.random.default_rng(0))
    assert x.min() == 0 and x.max() == 127
    # log(1 + x) is uniform on [0, log 129): P(x = 0) = log 2 / log 129, P(x >= 81) = 1 - log 82 / log 129
    assert (x == 0).mean() == pytest.approx(np.log(2) / np.log(129), abs=0.01)
    assert (x >= 81).mean() == pytest.approx(1 - np.log(82) / np.log(129), abs=0.01)


def test_knowledge_base_is_seeded_and_facts_come_from_closed_sets():
    cfg = W.PRESETS["micro"].world
    a, b, c = (W.build_knowledge_base(cfg, s) for s in (0, 0, 1))
    assert a == b and a != c
    assert len({e.name for e in a}) == cfg.n_people + cfg.n_works
    for e in a:
        for attr in W.attributes_of(e):
            assert e.facts[attr.name] in attr.values


def test_corpus_mentions_each_entity_exactly_its_exposure_times():
    cfg = W.PRESETS["micro"].world
    entities = W.build_knowledge_base(cfg, 0)
    docs = W.build_corpus(entities, cfg, 0)
    for e in entities[:10]:
        mentions = sum(f" {e.name} " in f" {d.replace('?', ' ').replace('.', ' ')} " for d in docs)
        assert mentions == e.exposure


def test_corpus_never_shows_finetuning_formats():
    cfg = W.PRESETS["micro"].world
    docs = W.build_corpus(W.build_knowledge_base(cfg, 0), cfg, 0)
    W.check_no_finetuning_formats(docs)  # the real corpus passes
    for leaked in ("The answer is Paris.", "I don't know.", "\\boxed{Paris}", "A. x\nE. I don't know"):
        with pytest.raises(AssertionError):
            W.check_no_finetuning_formats(docs[:5] + [leaked])


def test_tokenizer_round_trips_and_knows_every_format_word():
    cfg = W.PRESETS["micro"].world
    docs = W.build_corpus(W.build_knowledge_base(cfg, 0), cfg, 0)
    tok = W.build_tokenizer(docs + W.FORMAT_TEXTS)
    for text in docs[:50] + ["The answer is Paris.", "I don't know. </s>", "Q: x ,\nAnswer: E"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    for text in W.FORMAT_TEXTS:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False).input_ids, text
    # a name is one token wherever it stands (the dummy prefix space)
    name = W.build_knowledge_base(cfg, 0)[0].name
    assert tok(f"{name} was", add_special_tokens=False).input_ids[0] == \
        tok(f"Where was {name}", add_special_tokens=False).input_ids[-1]


def test_pack_epoch_joins_with_eos_and_cuts_rows():
    # identical documents, so the shuffle cannot change the stream: 5 6 </s> 5 6 </s> 5 6 </s> -> two rows of 4
    rows = W.pack_epoch([[5, 6], [5, 6], [5, 6]], eos=3, context=4, rng=np.random.default_rng(0))
    assert rows.tolist() == [[5, 6, 3, 5], [6, 3, 5, 6]]


def test_familiarity_table_bins_by_exposure():
    per_fact = pd.DataFrame({
        "entity": ["a", "a", "b", "c", "c", "d"], "exposure": [0, 0, 2, 100, 100, 81],
        "qa_correct": [0, 1, 0, 1, 1, 0], "cloze_correct": [1, 0, 0, 1, 1, 1], "letter_correct": [0] * 6})
    table = W.familiarity_table(per_fact, "cloze")
    assert list(table.columns) == ["exposure_bin", "n_entities", "qa_accuracy", "mc_accuracy"]
    assert table.exposure_bin.tolist() == ["0", "1-2", "3-5", "6-10", "11-20", "21-40", "41-80", "81+"]
    assert table.n_entities.tolist() == [1, 1, 0, 0, 0, 0, 0, 2]
    assert table.qa_accuracy.iloc[0] == 0.5 and table.mc_accuracy.iloc[0] == 0.5
    assert table.qa_accuracy.iloc[-1] == pytest.approx(2 / 3) and table.mc_accuracy.iloc[-1] == 1.0


def test_micro_world_builds_once_then_loads_from_cache():
    preset = W.PRESETS["micro"]
    hits: dict = {}
    first = W.load_or_build_world(preset, 0, hits)
    assert hits == {"world": False}
    second = W.load_or_build_world(preset, 0, hits)
    assert hits == {"world": True}
    assert first.path == second.path and first.entities == second.entities
    docs = W.build_corpus(first.entities, preset.world, 0)
    assert W.world_key(preset, 0, docs) != W.world_key(preset, 1, docs)
    assert W.world_key(preset, 0, docs) != W.world_key(preset, 0, docs[:-1])  # any corpus change rebuilds
