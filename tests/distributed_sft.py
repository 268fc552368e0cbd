"""The micro SFT under `torchrun` (see test_distributed.py): `python tests/distributed_sft.py OUT` runs one process,
`torchrun --nproc_per_node 2 tests/distributed_sft.py OUT` two, which split each global batch between them."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from common import models, results, sft, training  # noqa: E402
from common.world import build_tokenizer  # noqa: E402

CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Dublin", "Vienna"]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    names = ["Velorin", "Tovtan", "Karo", "Senbel", "Miath", "Fecor", "Ulul", "Eshbra"]
    tokenizer = models.prepare_tokenizer(build_tokenizer([f"Where was {n} born? {c}" for n, c in zip(names, CITIES)]))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = models.add_lora(LlamaForCausalLM(config), models.LoraSettings(r=4, alpha=8), seed=0)
    # every response is one word and EOS, so each process's token mean weighs its examples as the global one does
    prompts = [f"Where was {n} born?" for n in names]
    responses = [f" {c}" for c in CITIES]
    cfg = sft.SFTConfig(lr=1e-2, batch_size=4, total_steps=4, t_max=4, eta_min=1e-3, checkpoint_every=2)
    history = sft.train_sft(model, tokenizer, prompts, responses, cfg, out / "sft", seed=0)
    rank = training.accelerator().process_index
    results.write_json(out / f"written_by_rank{rank}.json", {"losses": history.loss.tolist()})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if torch.distributed.is_initialized():  # leave together: a process exiting mid-teardown aborts gloo
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
