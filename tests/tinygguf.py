"""Write a small random-weight llama GGUF that llama-server loads and serves.

The weights are random (the text is gibberish), the tokenizer is a byte-fallback SentencePiece
vocabulary: enough for a real llama-server to load, chat, stream and embed, and for GPU offload
and memory accounting to be real. Sizes are parameters so the GPU run can make a larger one.
Usable as a script: python tests/tinygguf.py OUT.gguf [--embd N --layers N --ff N --heads N --vocab-words N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, PoolingType, TokenType

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_llama(path: Path, *, embd: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 4,
                     ff: int = 128, words: int = 256, ctx: int = 2048, seed: int = 0, name: str = "tiny",
                     reranker: bool = False) -> Path:
    """A llama model; `reranker`: the same as a Qwen3-style reranker (llama.cpp's qwen3 with a
    one-score classification head, served by `llama-server --reranking`)."""
    rng = np.random.default_rng(seed)
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>", b"<|im_start|>", b"<|im_end|>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += [f"\u2581w{i}".encode() for i in range(words)]
    types += [TokenType.NORMAL] * words
    vocab = len(tokens)
    writer = GGUFWriter(str(path), "qwen3" if reranker else "llama")
    writer.add_name(name)
    writer.add_context_length(ctx)
    writer.add_embedding_length(embd)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(embd // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(4)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int, norm: bool = False) -> None:
        if norm:
            writer.add_tensor(name, np.ones(shape, dtype=np.float32))
        else:
            data = (rng.standard_normal(shape) * 0.02).astype(np.float16)
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType.F16)

    head_dim = embd // heads
    tensor("token_embd.weight", vocab, embd)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", embd, norm=True)
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, embd)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, embd)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, embd)
        tensor(f"blk.{i}.attn_output.weight", embd, heads * head_dim)
        if reranker:
            tensor(f"blk.{i}.attn_q_norm.weight", head_dim, norm=True)
            tensor(f"blk.{i}.attn_k_norm.weight", head_dim, norm=True)
        tensor(f"blk.{i}.ffn_norm.weight", embd, norm=True)
        tensor(f"blk.{i}.ffn_gate.weight", ff, embd)
        tensor(f"blk.{i}.ffn_up.weight", ff, embd)
        tensor(f"blk.{i}.ffn_down.weight", embd, ff)
    tensor("output_norm.weight", embd, norm=True)
    tensor("output.weight", vocab, embd)
    if reranker:
        writer.add_pooling_type(PoolingType.RANK)
        tensor("cls.output.weight", 1, embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--embd", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ff", type=int, default=128)
    parser.add_argument("--words", type=int, default=256)
    a = parser.parse_args()
    write_tiny_llama(a.out, embd=a.embd, layers=a.layers, heads=a.heads, kv_heads=a.heads, ff=a.ff, words=a.words)
    print(a.out, a.out.stat().st_size)


if __name__ == "__main__":
    main()


def write_tiny_lora(path: Path, base: Path, *, rank: int = 4, seed: int = 1) -> Path:
    """A LoRA adapter GGUF for a model from write_tiny_llama (attn_q and attn_v of every block)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(base))
    embd = int(reader.fields["llama.embedding_length"].contents())
    layers = int(reader.fields["llama.block_count"].contents())
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for i in range(layers):
        for name in ("attn_q", "attn_v"):
            for part, shape in (("lora_a", (rank, embd)), ("lora_b", (embd, rank))):
                data = (rng.standard_normal(shape) * 0.5).astype(np.float32)
                writer.add_tensor(f"blk.{i}.{name}.weight.{part}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
