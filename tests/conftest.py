"""Shared test fixtures. Tests never touch the network: the Hub is switched offline before anything imports it."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own empty cache, so cache hits are only the ones a test makes."""
    monkeypatch.setenv("UNFAMILIAR_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def tiny_tokenizer():
    from common.world import build_tokenizer

    texts = ["Q: Where was Velorin born?\nA: Paris\n\nQ: Where was Tovtan born?\nA: Rome",
             "The answer is Paris. I don't know. Answer: A B C D E", "A) B) C) D) , Answer: "]
    return build_tokenizer(texts)


def tiny_llama(tokenizer, hidden: int = 8, layers: int = 2, seed: int = 0, init_std: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         initializer_range=init_std)
    return LlamaForCausalLM(config)


def last_token_model(tokenizer, embed: dict[str, int], logits: dict[tuple[int, str], float], hidden: int = 8):
    """A Llama whose next-token logits depend only on the last input token, set by hand.

    Attention and MLP outputs are zeroed, so the residual stream is the last token's embedding. Token t with
    embed[t] = k gets the unit vector e_k, which the final RMSNorm turns into sqrt(hidden) * e_k; lm_head row r gets
    logits[(k, r)] / sqrt(hidden) in column k. So the logit of token r after token t is exactly logits[(k, r)].
    """
    model = tiny_llama(tokenizer, hidden=hidden)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for piece, k in embed.items():
            model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(piece), k] = 1.0
        for (k, piece), value in logits.items():
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(piece), k] = value / hidden ** 0.5
    model.eval()
    return model
