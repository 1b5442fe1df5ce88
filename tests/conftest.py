"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# A speed-aware compression (the default for causal LMs with a budget) times each layer shape on
# this machine; the tiny test models would get timing-dependent ranks (mostly "dense": two tiny
# products never beat one). Tests of other things run without caps, in every process they start;
# the speed tests install their own cost models (svdkit.speed.using_costs).
os.environ.setdefault("SVDKIT_NO_SPEED_CAPS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch (and BLAS) thread.

    The tensors in most tests are small: they gain nothing from threads, and oversubscribed
    OpenMP threads on shared cores slow them down by an order of magnitude.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
    else:
        with threadpool_limits(1):
            yield
    torch.set_num_threads(threads)


def build_decoder(
    family: str = "llama",
    *,
    causal: bool = False,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 112,
    vocab: int = 100,
    tied: bool = False,
    seed: int = 0,
):
    """A small transformers decoder with random weights, in eval mode.

    Parameters
    ----------
    family : {"llama", "qwen2"}
        LLaMA-style (no attention biases) or Qwen2-style (q/k/v biases); both with grouped-query
        attention when ``kv_heads < heads``.
    causal : bool
        ``...ForCausalLM`` (with the LM head) instead of the bare ``...Model``.
    tied : bool
        Tie the LM head to the input embedding (``tie_word_embeddings``).
    """
    import transformers

    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
    classes = {
        ("llama", False): transformers.LlamaModel, ("llama", True): transformers.LlamaForCausalLM,
        ("qwen2", False): transformers.Qwen2Model, ("qwen2", True): transformers.Qwen2ForCausalLM,
    }
    torch.manual_seed(seed)
    config = configs[family](
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=128, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, tie_word_embeddings=tied,
    )
    return classes[family, causal](config).eval()


# Tiny configs of every causal-LM family svdkit is tested on: (config class, model class, fields).
_ATTENTION = dict(num_hidden_layers=2, num_attention_heads=4)
CAUSAL_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, intermediate_size=64)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32)),
}


def tiny_causal_lm(family: str, seed: int = 0):
    """A tiny random causal LM of ``family`` (a key of :data:`CAUSAL_FAMILIES`), vocabulary 100, in eval mode."""
    import transformers

    config_name, model_name, fields = CAUSAL_FAMILIES[family]
    fields = dict(fields, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family != "gpt2":
        fields.update(_ATTENTION)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**fields)).eval()


@pytest.fixture(scope="session")
def make_decoder():
    """The :func:`build_decoder` factory, for tests that build small LLaMA/Qwen2 models."""
    return build_decoder


class LoRAMLP(nn.Module):
    """fc1 (24 -> 32), fc2 (32 -> 32), head (32 -> 10), ReLU between: the LoRA tests' small model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def mlp():
    """A seeded :class:`LoRAMLP` in eval mode (the LoRA tests' model)."""
    torch.manual_seed(0)
    return LoRAMLP().eval()



def build_tokenizer():
    """A byte-level BPE tokenizer (300 tokens) trained here on a few pydoc topics: nothing comes
    from a model hub."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from svdkit.data import builtin_documents

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(builtin_documents("topics")[:10], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """A transformers causal LM directory: a 2-block LLaMA (tied head, 300 tokens, context 128)
    with :func:`build_tokenizer`'s tokenizer. Tests that change it work on a copy."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    model = build_decoder("llama", causal=True, tied=True, layers=2, vocab=300)
    folder = tmp_path_factory.mktemp("lm") / "tiny-llama"
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder
