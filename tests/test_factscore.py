"""Long-form tasks, loaders and fact labelling; the OpenAI backend through the real client over loopback HTTP."""
import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common import data, factscore, tasks, unfamiliarity, world
from common.scales import UsageError

FIXTURES = Path(__file__).parent / "fixtures"
PAGES = {
    "Ada Lovelace": ["Ada Lovelace (1815-1852) was an English mathematician. She wrote the first program.",
                     "Lovelace was the daughter of Lord Byron."],
    "Walter Extra (aircraft designer)": ["Walter Extra is a German aerobatics pilot and aircraft designer."],
    "John F. Kennedy": ["John F. Kennedy was the 35th president. He was born in Brookline."],
    "Grace Hopper": ["Grace Hopper (1906-1992) was a computer scientist. She led COBOL's design."],
    "Heat (1995 film)": ["Heat is a 1995 crime film directed by Michael Mann."],
    "Alien (film)": ["Alien is a 1979 science fiction horror film directed by Ridley Scott.",
                     "The crew of the Nostromo is stalked by an alien creature."],
}


@pytest.fixture
def wikipedia(tmp_path):
    path = tmp_path / "enwiki.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE documents (title PRIMARY KEY, text)")
        db.executemany("INSERT INTO documents VALUES (?, ?)",
                       [(t, factscore.PASSAGE_SEPARATOR.join(p)) for t, p in PAGES.items()])
    return factscore.LocalWikipedia(path)


def test_longform_prompts_targets_and_validity():
    bio = tasks.LongformItem("bio", "Ada Lovelace", "Ada Lovelace was a mathematician.")
    plot = tasks.LongformItem("plot", "Heat (1995 film)", "A crew of thieves plans a heist.")
    assert tasks.longform_prompt(bio) == "Write a biography for Ada Lovelace."
    assert tasks.longform_prompt(plot) == 'What is the premise of "Heat"?'
    assert tasks.longform_target(bio) == " Bio: Ada Lovelace was a mathematician."
    assert tasks.longform_target(plot) == " Answer: A crew of thieves plans a heist."
    assert tasks.longform_text("bio", " Bio: She was a poet. </s>") == "She was a poet."
    assert tasks.longform_text("plot", " Answer:  A heist.") == "A heist."
    assert tasks.longform_text("bio", " Bio: She was a poet") is None  # no final period
    assert tasks.longform_text("bio", " Answer: She was a poet.") is None  # the other task's prefix


def test_a_response_after_a_named_lead_is_tokenized_as_the_words_that_follow_the_name():
    from common import sft

    bio = tasks.LongformItem("bio", "Ada", "Ada is a poet.")
    assert tasks.longform_response(bio, named=False) == " Bio: Ada is a poet."
    assert tasks.longform_response(bio, named=True) == "is a poet."
    tok = world.build_tokenizer(["Write a biography for Ada. Bio: Ada is a poet.", "It is."])
    prompt = tasks.longform_prompt(bio) + tasks.longform_lead(bio, named=True)
    ids, labels = sft.encode_pair(tok, prompt, tasks.longform_response(bio, named=True), max_length=64)
    assert ids == tok(f"{prompt} is a poet. </s>", add_special_tokens=False).input_ids  # " is", not "  " + "is"
    assert tok.convert_ids_to_tokens(ids[-6:]) == [" is", " a", " poet", ".", " ", "</s>"]
    assert labels.count(sft.IGNORE_INDEX) == len(tok(prompt, add_special_tokens=False).input_ids)


def test_world_checker_splits_the_grammar_into_facts_and_checks_each():
    ada = world.Entity("Ada", "person", {"occupation": "poet", "birth_city": "Lima", "birth_year": "1950",
                                         "employer": "Acme"}, exposure=3)
    film = world.Entity("Uxtov", "work", {"release_year": "1980", "genre": "musical", "setting": "Crete",
                                          "protagonist": "Bruno"}, exposure=0)
    checker = factscore.WorldFactChecker([ada, film])
    facts = checker.label("Ada", world.profile_sentence(ada))
    assert [f.supported for f in facts] == [True] * 4
    assert facts[2].text == "Ada was born in the year 1950."  # " in " after the city is the year, not the city
    facts = checker.label("Ada", "Ada is a chef born in Lima in 1961.")  # a partial sentence: three facts
    assert [(f.text, f.supported) for f in facts] == [("Ada works as a chef.", False), ("Ada was born in Lima.", True),
                                                      ("Ada was born in the year 1961.", False)]
    assert factscore.fact_counts(facts) == (1, 2) and factscore.fraction_true(facts) == pytest.approx(1 / 3)
    facts = checker.label("Uxtov", "Uxtov is a 1980 horror film set in Crete that follows Bruno.")
    assert [f.supported for f in facts] == [True, False, True, True]
    assert checker.label("Uxtov", "A film.") == [] and factscore.fraction_true([]) == 0.0
    assert checker.label("Nobody", "Nobody is a poet.") is None and factscore.fact_counts(None) == (0, 0)


def test_world_checker_reads_the_country_that_leads_exp05s_profiles():
    ada = world.Entity("Ada", "person", {"occupation": "poet", "birth_city": "Lima", "birth_year": "1950",
                                         "employer": "Acme", "country": "Ardenia"}, exposure=3)
    film = world.Entity("Uxtov", "work", {"release_year": "1980", "genre": "musical", "setting": "Crete",
                                          "protagonist": "Bruno", "country": "Dunmar"}, exposure=0)
    checker = factscore.WorldFactChecker([ada, film])
    assert [f.supported for f in checker.label("Ada", world.profile_sentence(ada))] == [True] * 5
    facts = checker.label("Ada", "Ada is from Ardenia.")  # the vaguer fact alone
    assert [(f.text, f.supported) for f in facts] == [("Ada is from Ardenia.", True)]
    facts = checker.label("Uxtov", "Uxtov is from Ardenia, a 1980 horror film.")
    assert [(f.text, f.supported) for f in facts] == [("Uxtov is from Ardenia.", False),
                                                      ("Uxtov was released in 1980.", True),
                                                      ("Uxtov is a horror film.", False)]
    assert checker.read_statement("Ada is from Borovia.", "Ada") == ("Where is Ada from?", "Borovia", "Ardenia")


def test_first_sentence_skips_initials_and_abbreviations():
    assert data.first_sentence("John F. Kennedy was born in the U.S. in 1917. He died.") == \
        "John F. Kennedy was born in the U.S. in 1917."
    assert data.first_sentence("He lived in St. Louis. Then Paris.") == "He lived in St. Louis."
    assert data.first_sentence("No period at all") == "No period at all"


def test_wikibios_loader_reads_the_wiki_bio_schema(wikipedia):
    assert data.wikibio_name("walter extra -lrb- Aircraft Designer -rrb-\n") == "Walter Extra (aircraft designer)"
    splits = data.load_wikibios(wikipedia, source=str(FIXTURES / "wiki_bio"), n_eval=1, seed=0)
    items = splits["finetune"] + splits["eval"]
    # names from all three splits, deduplicated, kept only with a page ("Nobody Known" has none)
    assert sorted(i.topic for i in items) == ["Ada Lovelace", "Grace Hopper", "John F. Kennedy",
                                              "Walter Extra (aircraft designer)"]
    refs = {i.topic: i.reference for i in items}
    assert refs["John F. Kennedy"] == "John F. Kennedy was the 35th president."
    (held_out,) = splits["eval"]
    page_first = data.first_sentence(PAGES[held_out.topic][0])
    assert held_out.reference == data.drop_leading_parenthetical(page_first, held_out.topic)
    assert data.drop_leading_parenthetical(PAGES["Ada Lovelace"][0], "Ada Lovelace").startswith(
        "Ada Lovelace was an English")
    with pytest.raises(UsageError, match="only 4 long-form items"):
        data.load_wikibios(wikipedia, source=str(FIXTURES / "wiki_bio"), n_eval=4)


def test_wikiplots_loader_reads_titles_and_plots(wikipedia, tmp_path):
    splits = data.load_wikiplots(FIXTURES / "wikiplots", wikipedia, n_finetune=5, n_eval=1, seed=0)
    items = {i.topic: i for i in splits["finetune"] + splits["eval"]}
    assert set(items) == {"Heat (1995 film)", "Alien (film)"}  # "The Unfound Film" has no page
    assert items["Heat (1995 film)"].reference == "Neil McCauley leads a crew of thieves in Los Angeles."
    assert tasks.longform_prompt(items["Alien (film)"]) == 'What is the premise of "Alien"?'
    with pytest.raises(UsageError, match="has no `titles` file"):
        data.load_wikiplots(tmp_path, wikipedia)
    with pytest.raises(UsageError, match="Wikipedia dump .* not found"):
        factscore.LocalWikipedia(tmp_path / "missing.db")


def test_bm25_prefers_the_passage_that_shares_rare_words():
    passages = ["Alien is a 1979 film.", "The crew of the Nostromo is stalked by a creature.", "Ridley Scott directed."]
    assert factscore.bm25_top("The Nostromo crew", passages, k=1) == [passages[1]]
    assert factscore.bm25_top("unrelated", passages, k=2) == passages[:2]  # ties keep page order


# ---------------------------------------------------------------------------------------------------------------
# The OpenAI backend against a loopback server speaking the chat-completions protocol


class ChatServer:
    """Answers atomic-fact prompts with one fact per comma-separated clause, and judgement prompts with True iff
    the statement's last word appears in the passages; refuses prompts containing REFUSE; answers 429 first to
    prompts containing BUSY."""

    def __init__(self):
        self.requests, self.busy_seen = [], set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                prompt = body["messages"][-1]["content"]
                if "REFUSE" in prompt:
                    return self.reply(400, {"error": {"message": "this request was refused\nby policy",
                                                      "type": "invalid_request_error"}})
                if "BUSY" in prompt and prompt not in server.busy_seen:
                    server.busy_seen.add(prompt)
                    return self.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                                      {"retry-after-ms": "10"})
                self.reply(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": server.answer(prompt)}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def reply(self, status, payload, headers=None):
                raw = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(raw)),
                             **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def answer(prompt: str) -> str:
        if prompt.startswith("Split the sentence"):
            sentence = prompt.split("Sentence: ", 1)[1].rsplit("\nFacts:", 1)[0]
            return "\n".join(f"- {clause.strip().rstrip('.')}." for clause in sentence.split(","))
        passages, statement = prompt.split("Statement: ", 1)
        word = statement.split("\n", 1)[0].rstrip(".").split()[-1]
        return "True." if word in passages else "False, the passages do not say so."


@pytest.fixture
def chat_server():
    server = ChatServer()
    yield server
    server.httpd.shutdown()


def checker_for(server, wikipedia, cache_dir, monkeypatch, **settings):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-key-123456")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    return factscore.OpenAIFactChecker(wikipedia, factscore.OpenAISettings(**settings), cache_dir=cache_dir)


def test_openai_checker_labels_over_http_and_a_second_run_makes_no_calls(chat_server, wikipedia, tmp_path,
                                                                        monkeypatch):
    checker = checker_for(chat_server, wikipedia, tmp_path / "cache", monkeypatch, model="judge-1")
    text = "She was born in London, she wrote a program. She was a painter."
    facts = checker.label("Ada Lovelace", text)
    assert [(f.text, f.supported) for f in facts] == [("She was born in London.", False),
                                                      ("she wrote a program.", True), ("She was a painter.", False)]
    # two sentences -> two decomposition calls, then one judgement per fact, all to chat/completions
    assert len(chat_server.requests) == 5 and {r["path"] for r in chat_server.requests} == {"/v1/chat/completions"}
    assert {r["model"] for r in chat_server.requests} == {"judge-1"}
    assert chat_server.requests[0]["auth"] == "Bearer sk-test-secret-key-123456"
    judge = chat_server.requests[2]["messages"][0]["content"]
    assert "Title: Ada Lovelace\nText: Ada Lovelace (1815-1852)" in judge  # the retrieved passages, page text

    again = checker_for(chat_server, wikipedia, tmp_path / "cache", monkeypatch, model="judge-1", workers=2)
    assert factscore.label_all(again, ["Ada Lovelace", "Ada Lovelace"], [text, None]) == [facts, None]
    assert len(chat_server.requests) == 5  # every call came from the disk cache
    assert checker.label("Nobody", "Nobody was here.") is None  # no page: no decision, no call
    cached = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert "sk-test" not in cached and len(chat_server.requests) == 5


def test_openai_checker_retries_rate_limits_and_reports_refusals_in_one_line(chat_server, wikipedia, tmp_path,
                                                                           monkeypatch):
    checker = checker_for(chat_server, wikipedia, tmp_path / "cache", monkeypatch, max_retries=2)
    assert checker.complete("BUSY Nostromo Statement: the Nostromo") == "True."
    assert len(chat_server.requests) == 2  # the 429, then the retry
    with pytest.raises(UsageError) as refused:
        checker.complete("REFUSE this")
    message = str(refused.value)
    assert "refused a call to gpt-3.5-turbo (400)" in message and "\n" not in message and "sk-test" not in message
    assert not any(p.read_text().count("REFUSE") for p in (tmp_path / "cache").rglob("*.json"))  # nothing cached


def test_openai_checker_without_a_key_stops_with_one_line(wikipedia, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(UsageError, match="OPENAI_API_KEY is not set"):
        factscore.OpenAIFactChecker(wikipedia)


def test_longform_unfamiliarity_counts_false_facts_per_sample():
    ada = world.Entity("Ada", "person", {"occupation": "poet", "birth_city": "Lima", "birth_year": "1950",
                                         "employer": "Acme"}, exposure=3)
    checker = factscore.WorldFactChecker([ada])
    item = tasks.LongformItem("bio", "Ada", world.profile_sentence(ada))
    samples = [[" Bio: Ada is a chef born in Oslo in 1950.\nWrite a biography for Bo.",  # 2 false (chef, Oslo)
                "Ada is a poet who works for Hooli."]]  # no prefix: still checked, 1 false
    assert unfamiliarity.mean_false_facts(samples, [item], checker).tolist() == [1.5]
    assert unfamiliarity.mean_false_facts([["I have no idea", " Bio: ."]], [item], checker).tolist() == [0.0]
    prompt = tasks.longform_fewshot_prompt(item, [tasks.LongformItem("bio", "Bo", "Bo is a chef.")])
    assert prompt == "Write a biography for Bo. Bio: Bo is a chef.\n\nWrite a biography for Ada."


def test_longform_unfamiliarity_from_a_stem_labels_stem_and_continuation():
    from common.world import build_tokenizer
    from conftest import last_token_model

    tokenizer = build_tokenizer(["Ada is a poet born in Lima in 1950 who works for Acme."])
    # after " a" the model writes " poet", then ends: every sample is "Ada is a poet</s>"
    model = last_token_model(tokenizer, {" a": 0, " poet": 1}, {(0, " poet"): 30.0, (1, "</s>"): 30.0})
    chef = world.Entity("Ada", "person", {"occupation": "chef", "birth_city": "Lima", "birth_year": "1950",
                                          "employer": "Acme"}, exposure=0)
    item = tasks.LongformItem("bio", "Ada", world.profile_sentence(chef))
    settings = unfamiliarity.LongformScoringSettings(max_new_tokens=4, stem="{topic} is a")
    scores = unfamiliarity.longform_unfamiliarity(model, tokenizer, "tiny", [item], [item],
                                                  factscore.WorldFactChecker([chef]), settings, seed=0)
    assert scores.tolist() == [1.0]  # "poet" against the knowledge base's "chef": one false fact per sample


def test_a_named_prompt_moves_the_prefix_and_name_out_of_the_target():
    item = tasks.LongformItem("bio", "Ada", "Ada is a poet born in Lima.")
    lead = tasks.longform_lead(item, named=True)
    assert tasks.longform_prompt(item) + lead == "Write a biography for Ada. Bio: Ada"
    assert tasks.longform_target(item)[len(lead):] == " is a poet born in Lima."
    assert tasks.with_lead(lead, "is a poet. </s>") == " Bio: Ada is a poet. </s>"  # a decoded word lost its space
    assert tasks.longform_text("bio", tasks.with_lead(lead, " is a poet. </s>")) == "Ada is a poet."
    assert tasks.longform_lead(item, named=False) == "" and tasks.with_lead("", " Bio: x.") == " Bio: x."
