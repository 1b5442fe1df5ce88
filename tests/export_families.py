"""Tiny random transformers models of every family svdkit exports, for the export tests."""

from __future__ import annotations

import torch

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama(t):
    return t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **COMMON))


def _qwen2(t):
    return t.Qwen2ForCausalLM(t.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **COMMON))


def _qwen3(t):
    return t.Qwen3ForCausalLM(t.Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **COMMON))


def _mistral(t):
    return t.MistralForCausalLM(t.MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, max_position_embeddings=64, sliding_window=8,
                                                tie_word_embeddings=False, **COMMON))


def _gemma2(t):
    return t.Gemma2ForCausalLM(t.Gemma2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=8, **COMMON))


def _gemma3(t):
    return t.Gemma3ForCausalLM(t.Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=8,
                                                  **COMMON))


def _phi3(t):
    return t.Phi3ForCausalLM(t.Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64, **COMMON))


def _opt(t):
    return t.OPTForCausalLM(t.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                        word_embed_proj_dim=32, max_position_embeddings=64, **COMMON))


def _gpt_neox(t):
    return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=64, **COMMON))


def _gpt2(t):
    return t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **COMMON))


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "gemma2": _gemma2, "gemma3": _gemma3,
            "phi3": _phi3, "opt": _opt, "gpt_neox": _gpt_neox, "gpt2": _gpt2}


def build(family: str, seed: int = 0):
    """A tiny random ``...ForCausalLM`` of ``family`` (2 blocks, hidden size 32), in eval mode.

    Its biases are random too (transformers initializes them to zero, which would hide a bias
    lost on the way).
    """
    import transformers

    torch.manual_seed(seed)
    model = FAMILIES[family](transformers).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
    return model


def token_batches(n: int = 4, seq: int = 12, seed: int = 1) -> list[torch.Tensor]:
    """Calibration batches of token ids, shape (2, seq) each."""
    ids = torch.randint(3, VOCAB, (2 * n, seq), generator=torch.Generator().manual_seed(seed))
    return list(ids.split(2))
