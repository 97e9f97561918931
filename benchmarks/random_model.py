"""A randomly initialized model of a known shape, saved as a local model folder.

For machines the real weights cannot reach (a GPU machine with no hub access, where the
embedded GGUF is too large to carry): the cost of training, generation and ES iterations
depends on the shapes, not the values, so a random model of the same shape measures it.
Scores of such a model mean nothing.

    python benchmarks/random_model.py smollm2-135m OUT_DIR --tokenizer TOKENIZER_DIR
    python benchmarks/random_model.py qwen2.5-1.5b OUT_DIR --tokenizer TOKENIZER_DIR

The tokenizer folder is any saved tokenizer whose ids fit the shape's vocabulary (the
embedded model's, from retain's cache, fits both).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig, Qwen2Config

SHAPES: dict[str, PretrainedConfig] = {
    # SmolLM2-135M-Instruct, as the embedded GGUF declares it.
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # Qwen2.5-1.5B-Instruct, the model of the published ES forgetting setting.
    "qwen2.5-1.5b": Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True, help="a saved tokenizer folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = SHAPES[args.shape]
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tok) > config.vocab_size:
        raise SystemExit(f"the tokenizer in {args.tokenizer} has {len(tok)} ids, more than {args.shape}'s "
                         f"vocabulary of {config.vocab_size}")
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initializing 1.5B weights on a GPU takes a second, not a minute
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {args.out}")


if __name__ == "__main__":
    main()
