from collections import Counter

import pytest
import torch

from common import data, models, tasks
from conftest import FIXTURES, tiny_llama


def test_mmlu_loader_reads_the_real_schema():
    splits = data.load_mmlu(str(FIXTURES / "mmlu"))
    assert {k: len(v) for k, v in splits.items()} == {"finetune": 6, "eval": 4, "fewshot": 10}
    q = splits["finetune"][0]
    assert q == tasks.MCQuestion("Which planet is closest to the Sun?", "astronomy",
                                 ("Venus", "Mercury", "Earth", "Mars"), 1)
    shots = data.fewshot_by_subject(splits["fewshot"])
    assert sorted(shots) == ["astronomy", "high_school_geography"] and all(len(v) == 5 for v in shots.values())


def test_mmlu_records_accept_letter_answers_and_reject_bad_rows():
    rows = [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "C"}]
    assert data.mmlu_records(rows, subject="s")[0].answer == 2
    with pytest.raises(ValueError):
        data.mmlu_records([{"question": "q", "choices": ["a", "b"], "answer": 0}])


def test_triviaqa_loader_reads_value_and_aliases():
    splits = data.load_triviaqa(str(FIXTURES / "trivia_qa"))
    assert [len(splits["finetune"]), len(splits["eval"])] == [6, 2]
    q = splits["eval"][0]
    assert (q.question_id, q.value) == ("qb_1", "George Orwell")
    assert "Eric Arthur Blair" in q.aliases
    assert tasks.grade_short_answer("The answer is Orwell. </s>", q) == tasks.CORRECT


def test_unreachable_dataset_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as err:
        data.load_split("no-such-org/no-such-dataset", None, "train")
    message = str(err.value)
    assert "no-such-org/no-such-dataset" in message and "\n" not in message
    with pytest.raises(SystemExit, match="has no validation.jsonl"):
        data.load_split(str(tmp_path), None, "validation")


def test_unreachable_model_is_a_one_line_error():
    with pytest.raises(SystemExit) as err:
        models.load_hf_model("no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in str(err.value) and "\n" not in str(err.value)


def test_load_hf_model_from_a_local_folder_sets_left_padding(tiny_tokenizer, tmp_path):
    tiny_llama(tiny_tokenizer).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tok = models.load_hf_model(str(tmp_path), dtype=torch.float32)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert not model.training


def test_lora_targets_q_and_v_only_with_hand_counted_parameters(tiny_tokenizer):
    model = models.add_lora(tiny_llama(tiny_tokenizer, hidden=8, layers=2), models.LoraSettings(), seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in trainable)
    # per layer and module: A is r x in, B is out x r. q: 8 -> 8; v: 8 -> 8 (2 kv heads of dim 4) -> 2*16*8 each
    assert models.count_parameters(model)[0] == 2 * 2 * (16 * 8 + 8 * 16)
    before = model(torch.tensor([[4, 5, 6]])).logits
    merged = models.merge_lora(model)  # B starts at zero, so merging a fresh adapter changes nothing
    assert torch.allclose(before, merged(torch.tensor([[4, 5, 6]])).logits, atol=1e-6)


def test_lora_init_depends_on_its_seed_only_and_leaves_the_global_rng_alone(tiny_tokenizer):
    def lora_a(seed, global_seed):
        base = tiny_llama(tiny_tokenizer, hidden=8, layers=2)
        torch.manual_seed(global_seed)
        model = models.add_lora(base, models.LoraSettings(), seed=seed)
        return torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_A" in n]), torch.rand(1)

    a, after = lora_a(seed=3, global_seed=1)
    b, _ = lora_a(seed=3, global_seed=2)
    c, _ = lora_a(seed=4, global_seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))  # the global stream goes on as if no adapter had been drawn


def test_merged_copy_folds_the_adapter_into_a_copy_and_leaves_the_base_as_it_was(tiny_tokenizer):
    base = tiny_llama(tiny_tokenizer, hidden=8, layers=2)
    x = torch.tensor([[4, 5, 6]])
    before = base(x).logits.detach()
    model = models.add_lora(base, models.LoraSettings(), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)  # a trained adapter: B is no longer zero
    adapted = model(x).logits.detach()
    start = models.merged_copy(model)
    assert torch.allclose(start(x).logits, adapted, atol=1e-5) and not torch.allclose(adapted, before)
    assert torch.equal(model.unload()(x).logits.detach(), before)


def test_trainable_tokens_train_their_embedding_and_output_rows_only_and_merge(tiny_tokenizer):
    base = tiny_llama(tiny_tokenizer, hidden=8, layers=2)
    embed, head = base.model.embed_tokens.weight.detach().clone(), base.lm_head.weight.detach().clone()
    model = models.add_lora(base, models.LoraSettings(trainable_tokens=(5, 7)), seed=0)
    # LoRA as above, plus 2 rows x 8 of the input embedding and 2 rows x 8 of the (untied) output layer
    assert models.count_parameters(model)[0] == 2 * 2 * (16 * 8 + 8 * 16) + 2 * 8 + 2 * 8
    x = torch.tensor([[4, 5, 7, 6]])  # 5 and 7 are read (not last) and predicted (not first)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(x, labels=x).loss.backward()
    optimizer.step()
    trained = model(x).logits.detach()
    merged = models.merge_lora(model)
    assert torch.allclose(trained, merged(x).logits, atol=1e-5)
    for before, after in ((embed, merged.model.embed_tokens.weight), (head, merged.lm_head.weight)):
        changed = (after.detach() - before).abs().sum(-1) > 0
        assert changed.nonzero().flatten().tolist() == [5, 7]


def test_format_tokens_are_every_piece_of_the_formats_once_and_nothing_else(tiny_tokenizer):
    settings = models.with_format_tokens(models.LoraSettings(), tiny_tokenizer, ["I don't know.", "The answer is "])
    pieces = tiny_tokenizer.convert_ids_to_tokens(list(settings.trainable_tokens))
    # " I", " don", "'", "t", " know", "." and " The", " answer", " is", and the lone space the prefix ends in;
    # no BOS/EOS, each id once, sorted
    assert sorted(pieces) == sorted([" I", " don", "'", "t", " know", ".", " The", " answer", " is", " "])
    assert list(settings.trainable_tokens) == sorted(set(settings.trainable_tokens))
    assert settings.target_modules == models.LoraSettings().target_modules


def test_simplefact_mix_reads_each_source_in_its_schema_and_mixes_them_evenly():
    folder = FIXTURES / "simplefact"
    sources = {name: str(folder / name) for name in data.SIMPLEFACT_SOURCES}
    splits = data.load_simplefact_mix(sources, per_source=2, eval_per_source=1, seed=0)
    assert len(splits["eval"]) == 4 and len(splits["finetune"]) == 8
    # asking for more than the smallest source holds (3 records, 1 held out) keeps the mix even: 2 per source
    uneven = data.load_simplefact_mix(sources, per_source=5, eval_per_source=1, seed=0)
    assert Counter(q.question_id.split("/")[0][:3] for q in uneven["finetune"]) == {"sim": 2, "pop": 2, "sel": 2,
                                                                                     "tc_": 2}
    prefixes = [q.question_id.split("/")[0] for q in splits["eval"]]
    assert prefixes[:3] == ["simpleqa", "popqa", "selfaware"] and prefixes[3].startswith("tc_")
    everything = {q.question: q for q in splits["eval"] + splits["finetune"]}
    if "What is George Rankin's occupation?" in everything:
        q = everything["What is George Rankin's occupation?"]
        assert (q.value, q.aliases) == ("politician", ("political leader", "political figure"))
    mars = data.simplefact_records("selfaware", [{"question_id": 2, "question": "Mars?", "answer": None,
                                                  "answerable": False}])[0]
    assert mars.value == "" and mars.aliases == ()
    hamlet = data.simplefact_records("selfaware", [{"question_id": 3, "question": "Who wrote Hamlet?",
                                                    "answer": ["William Shakespeare", "Shakespeare"],
                                                    "answerable": True}])[0]
    assert (hamlet.value, hamlet.aliases) == ("William Shakespeare", ("Shakespeare",))


def test_a_simplefact_source_that_cannot_be_fetched_is_one_line_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="selfaware"):
        data.load_simplefact_mix({"simpleqa": str(FIXTURES / "simplefact" / "simpleqa"),
                                  "popqa": str(FIXTURES / "simplefact" / "popqa"),
                                  "selfaware": str(tmp_path / "selfaware")})
