"""Write what clients need from a GGUF file into a folder: config.json, tokenizer.json and
tokenizer_config.json (special tokens and the chat template), built from the file's metadata
with transformers' GGUF tokenizer conversion. Clients (no torch) run it as a subprocess:

    python -m specmesh.kernels.gguf_export MODEL.gguf OUT_DIR

and cache the folder (`specmesh.clients.gguf_folder`). The weights stay in the GGUF file; the
model services load it directly (`specmesh.kernels.loader`).
"""

from __future__ import annotations

import json
import pathlib
import sys

from specmesh.kernels import gguf

COMPLETE = "specmesh-gguf-export.json"  # written last: the folder is whole


def export(path: pathlib.Path, out: pathlib.Path) -> None:
    from specmesh.kernels.hf_import import installed_kernels_first

    installed_kernels_first()  # transformers imports Hugging Face's `kernels`
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    r = gguf.reader(path)
    (out / "config.json").write_text(json.dumps(gguf.hf_config(r), indent=1))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = gguf.field(r, "tokenizer.chat_template")
    if template:  # our reader takes it from tokenizer_config.json (transformers 5 writes a file)
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=1))
    st = path.stat()
    (out / COMPLETE).write_text(json.dumps({"gguf": str(path), "size": st.st_size,
                                            "mtime_ns": st.st_mtime_ns}))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m specmesh.kernels.gguf_export MODEL.gguf OUT_DIR", file=sys.stderr)
        return 2
    export(pathlib.Path(args[0]).resolve(), pathlib.Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
