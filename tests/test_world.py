import numpy as np
import pandas as pd
import pytest
import torch

from common import tasks, world as W


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


def test_exp05_world_adds_a_mostly_shared_country_and_keeps_every_other_fact():
    plain = W.world_preset("synthetic", "micro").world
    assert plain.country_majority == 0.0 and W.world_preset("synthetic", "micro", 0.0) is W.PRESETS["micro"]
    with_country = W.world_preset("synthetic", "micro", 0.8).world
    a, b = W.build_knowledge_base(plain, 0), W.build_knowledge_base(with_country, 0)
    assert all("country" not in e.facts for e in a)
    assert [{k: v for k, v in e.facts.items() if k != "country"} for e in b] == [e.facts for e in a]
    countries = [e.facts["country"] for e in b]
    assert set(countries) <= set(W.COUNTRIES) and 0.6 < countries.count(W.COUNTRIES[0]) / len(b) < 0.95
    assert [a.name for a in W.attributes_of(b[0])][-1] == "country" and "country" not in W.ATTRIBUTES
    person = next(e for e in b if e.kind == "person")
    assert W.profile_sentence(person).startswith(f"{person.name} is from {person.facts['country']}, a "
                                                 f"{person.facts['occupation']} born in ")
    assert W.profile_sentence(a[b.index(person)]).startswith(f"{person.name} is a {person.facts['occupation']} ")
    assert W.profile_sentence(person, 1) == f"{person.name} is from {person.facts['country']}."
    assert W.profile_sentence(person, 2) == f"{person.name} is from {person.facts['country']}, a " \
                                            f"{person.facts['occupation']}."
    # the country is stated, asked and quizzed in pretraining like any other fact
    docs = W.knowledge_documents(b, with_country, 0)
    assert any(f"{e.name} is from {e.facts['country']}." in d for e in b for d in docs)
    assert any(f"Where is {e.name} from?" in d for e in b for d in docs)


def test_longform_references_keep_the_split_and_a_seeded_share_stop_after_an_earlier_clause():
    preset = W.world_preset("synthetic", "micro", 0.8)
    entities = W.build_knowledge_base(preset.world, 0)
    world = W.World(preset, 0, entities, tokenizer=None, model=None, path=None, build_info={})
    whole, cut = world.longform_splits("bio"), world.longform_splits("bio", shortened=0.5)
    assert [it.topic for it in whole["eval"]] == [it.topic for it in cut["eval"]]
    people = {e.name: e for e in entities}
    refs = [(it.reference, people[it.topic]) for split in cut.values() for it in split]
    assert all(it.reference == W.profile_sentence(people[it.topic]) for it in whole["finetune"] + whole["eval"])
    shortened = [r for r, e in refs if r != W.profile_sentence(e)]
    assert all(r in {W.profile_sentence(e, n) for n in range(1, 5)} for r, e in refs if r in shortened)
    assert 0.3 < len(shortened) / len(refs) < 0.7


def micro_corpus(epoch: int = 0):
    cfg = W.PRESETS["micro"].world
    entities = W.build_knowledge_base(cfg, 0)
    knowledge = W.knowledge_documents(entities, cfg, 0)
    return cfg, entities, knowledge, W.epoch_documents(knowledge, cfg, 0, epoch)


def mentions(name: str, docs: list[str]) -> int:
    return sum(f" {d.replace('?', ' ').replace('.', ' ')} ".count(f" {name} ") for d in docs)


def test_each_entity_has_exactly_its_exposure_in_passages_grouped_into_documents():
    from dataclasses import replace

    cfg, entities, knowledge, docs = micro_corpus()
    alone = W.knowledge_documents(entities, replace(cfg, max_passages=1), 0)
    for e in entities[:10]:
        assert sum(f" {e.name} " in f" {d.replace('?', ' ').replace('.', ' ')} " for d in alone) == e.exposure
        # grouping only joins the same passages into fewer documents, in every epoch
        assert mentions(e.name, knowledge) == mentions(e.name, alone) == mentions(e.name, docs)
    assert len(knowledge) < len(alone)
    assert any(d.count("Q: ") > 2 for d in knowledge)  # a quiz page with several entities


def test_no_multiple_choice_item_asks_about_a_heldout_fact():
    cfg = W.WorldConfig(n_people=30, n_works=10, doc_mix=(("mc", 1.0),))
    entities = W.build_knowledge_base(cfg, 0)
    heldout = W.heldout_mask(len(W.all_facts(entities)), cfg.heldout_frac, 0)
    asked = {(e.name, a.name) for (e, a), h in zip(W.all_facts(entities), heldout) if h}
    questions = {doc.split("\n")[-5] if doc.startswith("The following") else doc.split("\n")[0]
                 for doc in W.knowledge_documents(entities, cfg, 0)}
    heldout_questions = {W.ATTRIBUTES[a].question.format(e=e) for e, a in asked}
    assert questions and not questions & heldout_questions
    assert 0.2 < heldout.mean() < 0.4  # about heldout_frac of the facts, whatever their exposure


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_multiple_choice_items_are_answered_by_text_at_the_configured_share(share):
    cfg = W.WorldConfig(n_people=40, n_works=20, doc_mix=(("mc", 1.0),), mc_text_answers=share)
    docs = W.knowledge_documents(W.build_knowledge_base(cfg, 0), cfg, 0)
    option_labels, by_text = [f"{L}. " for L in tasks.LETTERS], []
    for doc in docs:
        options = [line[3:] for line in doc.split("\n") if line[:3] in option_labels]
        answer = doc.rsplit("Answer: ", 1)[1]
        assert len(options) == 4 and (answer in options or answer in tasks.LETTERS), doc
        by_text.append(answer in options)
    assert len(docs) > 100
    assert np.mean(by_text) == pytest.approx(share, abs=0.08)


def test_skill_documents_are_fresh_each_epoch_and_need_no_world_fact():
    cfg = W.SkillConfig(induction=3, equality=4, membership=6, answer_keys=5, key_entries=3)
    first, second = W.skill_documents(cfg, 0, 0), W.skill_documents(cfg, 0, 1)
    assert len(first) == 18 and first != second and first == W.skill_documents(cfg, 0, 0)
    induction, equality, key = first[0], first[3], first[-1]
    for doc in first[7:13]:  # membership: "w1 w2 ... . q? Yes/True" iff q is among the words
        words, rest = doc.split(". ")
        query, answer = rest.rstrip(".").split("? ")
        assert answer in (("Yes", "True") if query in words.split() else ("No", "False"))
    listed, again = induction.removeprefix("List: ").removesuffix(".").split(". Again: ")
    assert listed == again and all(w in W.SKILL_WORDS for w in listed.split())
    a, rest = equality.split(" and ")
    b, verdict = rest.split("? ")
    assert verdict == ("Same." if a == b else "Different.")
    options_line, entries = key.split("\n")
    words = options_line.split()  # "A) Oslo B) Lima C) Rome D) Cairo": one-word values
    assert words[0::2] == ["A)", "B)", "C)", "D)"]
    options = dict(zip("ABCD", words[1::2]))
    for entry in entries.rstrip(".").split(". "):
        parts = entry.split(" is ") if " is " in entry else entry.split(" ")
        text, letter = (parts[1], parts[0]) if parts[0] in "ABCD" else parts
        assert options[letter] == text


def test_corpus_never_shows_finetuning_formats():
    _, _, _, docs = micro_corpus()
    W.check_no_finetuning_formats(docs)  # the real corpus passes
    for leaked in ("The answer is Paris.", "I don't know.", "\\boxed{Paris}", "A. x\nE. I don't know"):
        with pytest.raises(AssertionError):
            W.check_no_finetuning_formats(docs[:5] + [leaked])


def test_tokenizer_round_trips_and_knows_every_format_word():
    cfg, _, _, docs = micro_corpus()
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


def test_pack_epoch_joins_with_eos_cuts_rows_and_restarts_positions_per_document():
    # 5 6 </s> 7 </s> 8 9 </s> -> two rows of 4 (the last token dropped); positions restart after each EOS
    rows, positions = W.pack_epoch([[5, 6], [7], [8, 9]], eos=3, context=4)
    assert rows.tolist() == [[5, 6, 3, 7], [3, 8, 9, 3]]
    assert positions.tolist() == [[0, 1, 2, 0], [1, 0, 1, 2]]


def test_packed_documents_do_not_attend_to_each_other():
    from conftest import tiny_llama

    _, _, _, docs = micro_corpus()
    tok = W.build_tokenizer(docs[:20])
    model = tiny_llama(tok, hidden=16)
    a, b = tok(docs[:2], add_special_tokens=False).input_ids
    rows, positions = W.pack_epoch([a, b], tok.eos_token_id, len(a) + len(b) + 2)
    with torch.no_grad():
        packed = model(input_ids=rows, position_ids=positions, use_cache=False).logits[0, len(a) + 1 :]
        alone = model(input_ids=torch.tensor([b + [tok.eos_token_id]])).logits[0]
    assert torch.allclose(packed, alone, atol=1e-5)


def test_unseen_names_get_their_own_tokens():
    cfg, entities, knowledge, docs = micro_corpus()
    tok = W.build_tokenizer(knowledge + docs + [e.name for e in entities] + W.FORMAT_TEXTS)
    unseen = [e for e in entities if e.exposure == 0]
    assert unseen and not any(e.name in d for e in unseen for d in docs)
    ids = {tok(f"Where was {e.name} born?", add_special_tokens=False).input_ids[2] for e in unseen}
    assert len(ids) == len(unseen) and tok.unk_token_id not in ids


def test_familiarity_table_bins_held_out_facts_by_exposure():
    from common import familiarity as F

    per_fact = pd.DataFrame({
        "entity": ["a", "a", "b", "c", "c", "d", "d"], "exposure": [0, 0, 2, 100, 100, 81, 81],
        "heldout": [True, True, True, True, True, True, False],
        "qa_correct": [0, 1, 0, 1, 1, 0, 1], "qa_t1_accuracy": [0, 0.5, 0, 1, 0.75, 0.25, np.nan],
        "cloze_correct": [1, 0, 0, 1, 1, 1, np.nan], "letter_correct": [0, 0, 0, 1, 0, 0, np.nan],
        "item_recall_correct": [0, 0, 1, 1, 1, 0, np.nan],
        "verify_p_right": [0.5, 0.5, 0.5, 0.9, 0.7, 0.5, np.nan], "verify_p_wrong": [0.5, 0.5, 0.5, 0.1, 0.3, 0.5, np.nan],
        "rm_p_right": [0.2, 0.4, 0.5, 1.0, 0.8, 0.9, np.nan], "rm_p_wrong": [0.2, 0.4, 0.5, 0.0, 0.2, 0.3, np.nan]})
    table = F.familiarity_table(per_fact)
    assert tuple(table.columns) == F.TABLE_COLUMNS
    assert table.exposure_bin.tolist() == ["0", "1-2", "3-5", "6-10", "11-20", "21-40", "41-80", "81+"]
    assert table.n_entities.tolist() == [1, 1, 0, 0, 0, 0, 0, 2]
    first, last = table.iloc[0], table.iloc[-1]
    assert (first.qa_accuracy, first.qa_t1_accuracy, first.mc_accuracy) == (0.5, 0.25, 0.5)
    # the 81+ bin holds three held-out facts of c and d; d's finetuning-pool fact is not counted
    assert last.qa_accuracy == pytest.approx(2 / 3) and last.qa_t1_accuracy == pytest.approx(2 / 3)
    assert last.letter_accuracy == pytest.approx(1 / 3)
    assert last.item_recall_accuracy == pytest.approx(2 / 3)
    assert last.verify_separation == pytest.approx(0.7 - 0.3)  # (0.9 + 0.7 + 0.5) / 3 - (0.1 + 0.3 + 0.5) / 3
    assert last.rm_probe_separation == pytest.approx(0.9 - 0.5 / 3)
    claims = {c.id: c for c in F.gates(table, {"induction": 1.0, "equality_separation": 0.9, "letter_binding": 0.5})}
    assert claims["world.letter_binding"].passed is False and claims["world.induction"].passed
    assert claims["world.rm_probe_separation"].value == pytest.approx(0.9 - 0.5 / 3)
    assert claims["world.item_recall_most_exposed"].value == pytest.approx(2 / 3)
    assert claims["world.item_recall_most_exposed"].passed is False  # below 0.8


def test_micro_world_builds_once_then_loads_from_cache():
    preset = W.PRESETS["micro"]
    hits: dict = {}
    first = W.load_or_build_world(preset, 0, hits)
    assert hits == {"world": False}
    second = W.load_or_build_world(preset, 0, hits)
    assert hits == {"world": True}
    assert first.path == second.path and first.entities == second.entities
    docs = W.knowledge_documents(first.entities, preset.world, 0)
    assert W.world_key(preset, 0, docs) != W.world_key(preset, 1, docs)
    assert W.world_key(preset, 0, docs) != W.world_key(preset, 0, docs[:-1])  # any corpus change rebuilds


def test_evaluation_pool_asks_each_heldout_fact_again_with_fresh_distractors():
    preset = W.PRESETS["micro"]
    world = W.World(preset, 0, W.build_knowledge_base(preset.world, 0), None, None, None, {})
    one, three = world.mmlu_splits(eval_variants=1), world.mmlu_splits(eval_variants=3)
    n = len(one["eval"])
    assert n > 0 and three["finetune"] == one["finetune"] and three["eval"][:n] == one["eval"]
    assert len(three["eval"]) == 3 * n
    for k, q in enumerate(one["eval"]):
        variants = [three["eval"][k + v * n] for v in range(3)]
        assert {(x.question, x.choices[x.answer]) for x in variants} == {(q.question, q.choices[q.answer])}
        assert len({frozenset(x.choices) for x in variants}) == 3  # 3 of 23+ other values: a repeat is unlikely
