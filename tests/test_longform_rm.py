import numpy as np
import pytest

from common import factscore, longform_rm, tasks, world

ADA = world.Entity("Ada", "person", {"occupation": "poet", "birth_city": "Lima", "birth_year": "1950",
                                     "employer": "Acme"}, exposure=3)
UXTOV = world.Entity("Uxtov", "work", {"release_year": "1980", "genre": "musical", "setting": "Crete",
                                       "protagonist": "Bruno"}, exposure=0)


def test_response_reward_is_two_per_true_fact_minus_three_per_false_and_minus_fifteen_when_invalid():
    assert longform_rm.response_reward(3, 1) == 3.0
    assert longform_rm.response_reward(0, 0) == 0.0
    assert longform_rm.response_reward(1, 2) == -4.0
    assert longform_rm.response_reward(4, 0, valid=False) == -15.0


def test_world_checker_reads_its_facts_back_as_question_candidate_and_truth():
    read = factscore.WorldFactChecker([ADA, UXTOV]).read_statement
    assert read("Ada was born in Rome.") == ("Where was Ada born?", "Rome", "Lima")
    assert read("Ada was born in the year 1961.") == ("In which year was Ada born?", "1961", "1950")
    assert read("The protagonist of Uxtov is Clara.") == ("Who is the protagonist of Uxtov?", "Clara", "Bruno")
    assert read("Nobody was born in Rome.") is None  # not an entity of the world
    assert read("Ada is nice.") is None
    assert read("Uxtov was born in Rome.") is None  # a film has no birth city


def test_classifier_data_recalls_the_truth_and_skips_what_it_cannot_read():
    checker = factscore.WorldFactChecker([ADA])
    classifier = longform_rm.FactClassifier("bio", checker)
    texts = ["Ada is a chef born in Lima in 1961.", None]
    examples = longform_rm.fact_examples(["Ada", "Ada"], factscore.label_all(checker, ["Ada", "Ada"], texts))
    assert [(e.fact, e.supported) for e in examples] == [("Ada works as a chef.", False),
                                                         ("Ada was born in Lima.", True),
                                                         ("Ada was born in the year 1961.", False)]
    prompts, rewards, recalled = classifier.training_data(
        examples + [longform_rm.FactExample("Ada", "Ada is nice.", True)])
    assert prompts[0] == "Q: What is the occupation of Ada?\nA: chef\n" and len(prompts) == 3
    assert rewards == [0, 1, 0] and recalled == ["poet", "Lima", "1950"]
    paper = longform_rm.FactClassifier("plot")
    assert paper.query("Uxtov (film)", "Bruno is the hero.") == \
        ('Is the following a plot point in "Uxtov (film)"? Bruno is the hero.', None, None)
    assert paper.training_data(examples)[2] is None and paper.verdicts == {1: "Yes.", 0: "No."}


class JudgesByWord(longform_rm.FactClassifier):
    """A classifier that judges a fact true iff it mentions Lima (the reward arithmetic on its own)."""

    def judge(self, model, tokenizer, topics, facts, batch_size):
        return np.array(["Lima" in f for f in facts], dtype=bool)


def test_predicted_rewards_add_up_judgements_per_response():
    facts = [["Ada was born in Lima.", "Ada works as a chef.", "Lima is big."], None, []]
    rewards = longform_rm.predicted_rewards(JudgesByWord("bio"), None, None, ["Ada"] * 3, facts, batch_size=2)
    assert rewards.tolist() == [2 + 2 - 3, -15.0, 0.0]


def test_noisy_profile_replaces_each_fact_at_the_error_rate():
    checker = factscore.WorldFactChecker([ADA])
    rng = np.random.default_rng(0)
    assert world.noisy_profile(ADA, 0.0, rng) == world.profile_sentence(ADA)
    assert factscore.fact_counts(checker.label("Ada", world.noisy_profile(ADA, 1.0, rng))) == (0, 4)
    wrong = [factscore.fact_counts(checker.label("Ada", world.noisy_profile(ADA, 0.2, rng)))[1] for _ in range(500)]
    assert np.mean(wrong) / 4 == pytest.approx(0.2, abs=0.03)


def test_paper_fact_classifier_prompts():
    assert tasks.fact_classifier_prompt("bio", "Ada Lovelace", "She was a mathematician.") == \
        "She was a mathematician. Is the answer to the question correct?"


def test_decomposer_targets_number_the_atoms_and_its_output_is_read_back_as_the_authors_did():
    atoms = ["Ada works as a chef.", "Ada was born in Lima."]
    target = longform_rm.decomposition_target(atoms)
    assert target == " Fact 1: Ada works as a chef.\nFact 2: Ada was born in Lima."
    assert longform_rm.parse_decomposition(target + " </s>") == atoms
    # lines not ending in "." are dropped; a line without a label is kept whole
    assert longform_rm.parse_decomposition("Fact 1: Ada works as\nAda is. \nFact 3: x: y.") == ["Ada is.", "x: y."]
    assert longform_rm.decomposition_target([]) == "" and longform_rm.parse_decomposition("</s>") == []
    checker = factscore.WorldFactChecker([ADA])
    texts = ["Ada is a chef born in Lima in 1961.", None, "Ada."]
    inputs, targets = longform_rm.decomposition_pairs(texts, factscore.label_all(checker, ["Ada"] * 3, texts))
    assert inputs == [texts[0], "Ada."] and targets[1] == ""
    assert longform_rm.parse_decomposition(targets[0]) == ["Ada works as a chef.", "Ada was born in Lima.",
                                                           "Ada was born in the year 1961."]


def test_unsupported_words_are_those_only_false_facts_contain():
    checker = factscore.WorldFactChecker([ADA])
    text = "Ada is a chef born in Lima in 1961."
    marked = factscore.mark_unsupported(text, checker.label("Ada", text), "Ada")
    assert [w for w, m in marked if m] == ["chef", "1961."]
    assert not any(m for _, m in factscore.mark_unsupported(text, None, "Ada"))


def test_labeller_decomposer_gives_the_labellers_atoms_and_none_for_invalid_responses():
    decomposer = longform_rm.labeller_decomposer(factscore.WorldFactChecker([ADA]))
    assert decomposer(["Ada", "Ada"], ["Ada is a chef born in Lima.", None]) == [
        ["Ada works as a chef.", "Ada was born in Lima."], None]
    rm = longform_rm.TwoStageRewardModel(decomposer, None, JudgesByWord("bio"), None, batch_size=2)
    assert rm.rewards(["Ada", "Ada"], ["Ada is a chef born in Lima.", None]).tolist() == [-3 + 2, -15.0]


def test_classifier_reads_a_fact_about_the_prompts_entity_whatever_its_subject_word():
    classifier = longform_rm.FactClassifier("bio", factscore.WorldFactChecker([ADA]))
    assert classifier.query("Ada", "Fact 1:Q was born in Rome.") == ("Q: Where was Ada born?\nA: Rome\n", "Rome",
                                                                     "Lima")
