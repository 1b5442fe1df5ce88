"""A tiny byte-level BPE tokenizer and a tiny random LLaMA model, for tests of scoring text.

They stand in for a real LLM: fast, offline, with a real transformers tokenizer (saved and
reloaded like any hub tokenizer), so that tokenization conventions are exercised; never quality.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on 40 k characters of each evaluation domain (``<|endoftext|>`` is id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from svdkit.data import evaluation_documents, evaluation_domains

    texts = ["\n\n".join(evaluation_documents(domain))[:40_000] for domain in evaluation_domains()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    token = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=token, bos_token=token, pad_token=token)


def tiny_llama(vocab_size: int, *, max_positions: int = 1024, seed: int = 0):
    """A two-layer LLaMA causal LM (hidden 64, grouped-query attention) with random weights, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()
